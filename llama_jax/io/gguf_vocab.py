"""The tokenizer of a GGUF file, both ways: its `tokenizer.*` metadata -> tokenizer files saved with a converted
checkpoint, and a checkpoint's tokenizer files -> that metadata for export.

- `tokenizer.ggml.model = llama` (SentencePiece, Llama 1/2): a `tokenizer.model` protobuf rebuilt with
  sentencepiece's model proto (pieces, scores, types; BPE with byte fallback; identity normalizer, as Meta's).
- `tokenizer.ggml.model = gpt2` (byte-level BPE, Llama 3): a `tokenizer.json` built with the `tokenizers`
  library; `pre = llama-bpe` gets Llama 3's split regex (and tiktoken's ignore_merges).
- `tokenizer.chat_template`, BOS/EOS and add_bos_token -> `tokenizer_config.json`.
Token types are llama.cpp's (the same numbers as SentencePiece's piece types).
"""

from __future__ import annotations

import base64
import json
import os
import re
from typing import Dict, List, Optional, Tuple

from llama_jax.errors import ConversionError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Meta's Llama 3 split pattern (the same string as llama_jax/text/tiktoken_tokenizer.py; io may not import
# text, and tests/test_gguf.py checks the two are equal).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TYPES = ("llama-bpe", "default")  # the `pre` values whose pre-tokenizer is rebuilt here
T = "tokenizer.ggml."


# ---------------------------------------------------------------------------------------------- import
def write_tokenizer(meta: Dict[str, object], dst: str, path: str) -> List[str]:
    """Write the tokenizer files of GGUF metadata `meta` into `dst`; their names ([] when the file has none)."""
    kind = meta.get(T + "model")
    if kind is None:
        return []
    tokens = meta.get(T + "tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ConversionError(f"{path}: metadata {T}tokens is missing or empty ({T}model={kind!r})")
    types = [int(t) for t in meta.get(T + "token_type", [NORMAL] * len(tokens))]
    if len(types) != len(tokens):
        raise ConversionError(f"{path}: metadata {T}token_type has {len(types)} entries for {len(tokens)} tokens")
    if kind == "llama":
        files = [_write_sentencepiece(meta, tokens, types, dst, path)]
    elif kind == "gpt2":
        files = [_write_bpe(meta, tokens, types, dst, path)]
    else:
        raise ConversionError(f"{path}: {T}model={kind!r}: llama_jax rebuilds 'llama' (SentencePiece) and 'gpt2' "
                              "(byte-level BPE) tokenizers")
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump(_tokenizer_config(meta, tokens, kind), f, indent=2, ensure_ascii=False)
    return files + ["tokenizer_config.json"]


def _id(meta, key: str, tokens, path: str) -> Optional[int]:
    tid = meta.get(T + key)
    if tid is None:
        return None
    if not isinstance(tid, int) or not 0 <= tid < len(tokens):
        raise ConversionError(f"{path}: metadata {T}{key}={tid!r}: expected a token id in [0, {len(tokens)})")
    return tid


def _write_sentencepiece(meta, tokens, types, dst, path) -> str:
    from sentencepiece import sentencepiece_model_pb2 as pb

    scores = meta.get(T + "scores")
    scores = [0.0] * len(tokens) if scores is None else [float(s) for s in scores]
    if len(scores) != len(tokens):
        raise ConversionError(f"{path}: metadata {T}scores has {len(scores)} entries for {len(tokens)} tokens")
    proto = pb.ModelProto()
    for token, score, kind in zip(tokens, scores, types):
        proto.pieces.add(piece=token, score=score, type=kind if kind in (1, 2, 3, 4, 5, 6) else NORMAL)
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = BYTE in types
    for role, key in (("unk", "unknown_token_id"), ("bos", "bos_token_id"), ("eos", "eos_token_id")):
        tid = _id(meta, key, tokens, path)
        setattr(spec, f"{role}_id", -1 if tid is None else tid)
        if tid is not None:
            setattr(spec, f"{role}_piece", tokens[tid])
    spec.pad_id = -1
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(meta.get(T + "add_space_prefix", True))
    norm.remove_extra_whitespaces = bool(meta.get(T + "remove_extra_whitespaces", False))
    norm.escape_whitespaces = True
    with open(os.path.join(dst, "tokenizer.model"), "wb") as f:
        f.write(proto.SerializeToString())
    return "tokenizer.model"


def _write_bpe(meta, tokens, types, dst, path) -> str:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel, Split

    pre = meta.get(T + "pre", "default")
    if pre not in PRE_TYPES:
        raise ConversionError(f"{path}: {T}pre={pre!r}: llama_jax rebuilds the pre-tokenizer of "
                              f"{', '.join(PRE_TYPES)} only")
    merges = [tuple(m.split(" ", 1)) for m in meta.get(T + "merges") or []]
    if any(len(m) != 2 for m in merges):
        raise ConversionError(f"{path}: metadata {T}merges: expected entries 'left right'")
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre == "llama-bpe"))
    if pre == "llama-bpe":
        tok.pre_tokenizer = pre_tokenizers.Sequence([Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                                                     ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Control and user-defined tokens match whole in text (the ids are their vocabulary ids).
    tok.add_tokens([AddedToken(t, special=kind == CONTROL, normalized=False)
                    for t, kind in zip(tokens, types) if kind in (CONTROL, USER_DEFINED)])
    tok.post_processor = _bos_eos_processor(meta, tokens)
    tok.save(os.path.join(dst, "tokenizer.json"))
    return "tokenizer.json"


def _bos_eos_processor(meta, tokens):
    """The post-processor that adds BOS / EOS as the GGUF says llama.cpp should (add_bos_token defaults to
    true): a tokenizer.json's own rule is its post-processor (transformers 5 reads nothing else), as in Meta's
    Llama 3 tokenizer.json; None when it adds neither."""
    from tokenizers import processors

    ends = []
    for flag, default, key in (("add_bos_token", True, "bos_token_id"), ("add_eos_token", False, "eos_token_id")):
        tid = meta.get(T + key)
        if bool(meta.get(T + flag, default)) and isinstance(tid, int) and 0 <= tid < len(tokens):
            ends.append((tokens[tid], tid))
        else:
            ends.append(None)
    if ends == [None, None]:
        return None
    head = f"{ends[0][0]} " if ends[0] else ""
    tail = f" {ends[1][0]}" if ends[1] else ""
    return processors.TemplateProcessing(single=f"{head}$A{tail}", pair=f"{head}$A{tail} {head}$B:1{tail}",
                                         special_tokens=sorted({e for e in ends if e}, key=lambda e: e[1]))


def _tokenizer_config(meta, tokens, kind) -> dict:
    out: Dict[str, object] = {"tokenizer_class": "LlamaTokenizer" if kind == "llama" else "PreTrainedTokenizerFast"}
    for role, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                      ("pad_token", "padding_token_id")):
        tid = meta.get(T + key)
        if isinstance(tid, int) and 0 <= tid < len(tokens):
            out[role] = tokens[tid]
    out["add_bos_token"] = bool(meta.get(T + "add_bos_token", True))
    out["add_eos_token"] = bool(meta.get(T + "add_eos_token", False))
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        out["chat_template"] = template
    return out


# ---------------------------------------------------------------------------------------------- export
def tokenizer_metadata(directory: str) -> Dict[str, Tuple[object, str]]:
    """{key: (value, kind)} of a checkpoint directory's tokenizer (tokenizer.model as SentencePiece or Meta's
    tiktoken file, else tokenizer.json) and tokenizer_config.json; {} when it has none."""
    tc = _read_json(os.path.join(directory, "tokenizer_config.json"))
    model, hf_json = (os.path.join(directory, n) for n in ("tokenizer.model", "tokenizer.json"))
    if os.path.isfile(model) and not _is_tiktoken(model):
        out = _sentencepiece_metadata(model)
    elif os.path.isfile(hf_json):
        out = _bpe_metadata(*_from_tokenizer_json(hf_json))
    elif os.path.isfile(model):
        out = _bpe_metadata(*_from_tiktoken(model))
    else:
        return {}
    tokens = out[T + "tokens"][0]
    for role, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id")):
        name = tc.get(role)
        name = name.get("content") if isinstance(name, dict) else name
        if isinstance(name, str) and name in tokens:
            out[T + key] = (tokens.index(name), "uint32")
    for key in ("add_bos_token", "add_eos_token"):
        if isinstance(tc.get(key), bool):
            out[T + key] = (tc[key], "bool")
    if out[T + "model"][0] == "gpt2" and os.path.isfile(hf_json):  # the tokenizer.json branch above
        out.update(_post_processor_flags(hf_json, out))  # transformers 5 reads a tokenizer.json's rule, not tc's
    template = tc.get("chat_template")
    if isinstance(template, str) and template:
        out["tokenizer.chat_template"] = (template, "string")
    return out


def _post_processor_flags(hf_json: str, out) -> Dict[str, Tuple[object, str]]:
    """add_bos_token / add_eos_token as the tokenizer.json's post-processor applies them to one text."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(hf_json).encode("a", add_special_tokens=True).ids
    bos, eos = (out.get(T + k, (None,))[0] for k in ("bos_token_id", "eos_token_id"))
    return {T + "add_bos_token": (bool(ids) and ids[0] == bos, "bool"),
            T + "add_eos_token": (bool(ids) and ids[-1] == eos and len(ids) > 1, "bool")}


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: unreadable JSON ({e})") from None
    return d if isinstance(d, dict) else {}


def _is_tiktoken(path: str) -> bool:
    with open(path, "rb") as f:
        lines = [line for line in f.read(4096).split(b"\n")[:20] if line.strip()]
    return bool(lines) and all(re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", line.strip()) for line in lines[:-1] or lines)


def _sentencepiece_metadata(path: str) -> Dict[str, Tuple[object, str]]:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
    except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError
        raise ConversionError(f"{path}: not a SentencePiece model ({e})") from None
    spec = proto.trainer_spec
    out = {T + "model": ("llama", "string"), T + "pre": ("default", "string"),
           T + "tokens": ([p.piece for p in proto.pieces], "array"),
           T + "scores": ([float(p.score) for p in proto.pieces], "array"),
           T + "token_type": ([int(p.type) for p in proto.pieces], "array"),
           T + "add_space_prefix": (bool(proto.normalizer_spec.add_dummy_prefix), "bool"),
           T + "add_bos_token": (True, "bool"), T + "add_eos_token": (False, "bool")}
    for key, tid in (("unknown_token_id", spec.unk_id), ("bos_token_id", spec.bos_id), ("eos_token_id", spec.eos_id),
                     ("padding_token_id", spec.pad_id)):
        if 0 <= tid < len(proto.pieces):
            out[T + key] = (tid, "uint32")
    return out


def _from_tokenizer_json(path: str):
    """(tokens by id, merges, types, pre) of a byte-level BPE tokenizer.json."""
    d = _read_json(path)
    model = d.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ConversionError(f"{path}: model.type={model.get('type')!r}: GGUF export writes byte-level BPE "
                              "tokenizer.json files (Llama 3) or SentencePiece tokenizer.model files")
    pre = "llama-bpe" if LLAMA3_PATTERN in _regexes(d.get("pre_tokenizer")) else "default"
    by_id = {int(i): t for t, i in model["vocab"].items()}
    types = {i: NORMAL for i in by_id}
    for added in d.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
        types[int(added["id"])] = CONTROL if added.get("special") else USER_DEFINED
    n = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return tokens, merges, [types.get(i, UNUSED) for i in range(n)], pre


def _regexes(node) -> List[str]:
    """Every {"Regex": pattern} in a tokenizer.json pre_tokenizer tree."""
    if isinstance(node, dict):
        found = [node["Regex"]] if isinstance(node.get("Regex"), str) else []
        return found + [r for v in node.values() for r in _regexes(v)]
    return [r for v in node for r in _regexes(v)] if isinstance(node, list) else []


def _from_tiktoken(path: str):
    """(tokens, merges, types, pre) of Meta's tiktoken tokenizer.model plus its 256 Llama 3 special tokens.
    Merges: every split (a, b) of a token into two tokens, ordered by the rank of the whole token, which is
    tiktoken's rule (merge the adjacent pair whose concatenation ranks lowest)."""
    ranks: Dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
                except ValueError:
                    raise ConversionError(f"{path}:{lineno}: expected '<base64 token> <rank>'") from None
    to_str = _bytes_to_unicode()
    text = lambda b: "".join(to_str[x] for x in b)  # noqa: E731
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token))
                  if ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank]
        merges += [f"{text(a)} {text(b)}" for a, b in sorted(splits, key=lambda ab: (ranks[ab[0]], ranks[ab[1]]))]
    tokens = [text(t) for t, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    specials = _llama3_specials()
    return tokens + specials, merges, [NORMAL] * len(tokens) + [CONTROL] * len(specials), "llama-bpe"


def _llama3_specials() -> List[str]:
    named = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
    return list(named) + [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(named))]


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's printable stand-ins for bytes, in which byte-level BPE vocabularies are written."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe_metadata(tokens, merges, types, pre) -> Dict[str, Tuple[object, str]]:
    out = {T + "model": ("gpt2", "string"), T + "pre": (pre, "string"), T + "tokens": (tokens, "array"),
           T + "token_type": (types, "array"), T + "merges": (merges, "array")}
    for key, name in (("bos_token_id", "<|begin_of_text|>"), ("eos_token_id", "<|end_of_text|>")):
        if name in tokens:
            out[T + key] = (tokens.index(name), "uint32")
    return out
