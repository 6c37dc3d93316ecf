"""One tokenizer interface over the three formats Llama checkpoints ship, plus chat prompts.

- SentencePiece `tokenizer.model` (Llama 1/2, Code Llama), through the `sentencepiece` library;
- Meta's tiktoken-format `tokenizer.model` (Llama 3.x): lines of `<base64 token> <rank>`, Meta's split
  pattern, and 256 special tokens numbered right after the mergeable ranks (128000.. for Llama 3);
- a Hugging Face `tokenizer.json`, through the `tokenizers` library.

`load_tokenizer(path)` picks one from a file or a checkpoint directory. Every tokenizer has
`encode(text, *, bos=True, eos=False) -> list[int]` (exactly one BOS: never one added by the backend),
`decode(ids) -> str`, `bos_id`, `eos_id`, `stop_ids`, `vocab_size`, and `encode_chat(messages)` /
`render_chat(messages)` for Llama 2 chat, Llama 3 instruct or the checkpoint's own Jinja `chat_template`.
Plain `encode` never turns text like "<|eot_id|>" into a control token; only chat formats emit them.
"""

from __future__ import annotations

import base64
import json
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union
from llama_jax.errors import TokenizerError  # noqa: F401 (also re-exported)

# Meta's Llama 3 pre-tokenizer split pattern.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_LLAMA3_SPECIAL = 256
_LLAMA3_NAMED = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")


def llama3_special_tokens() -> List[str]:
    """Meta's 256 Llama 3.x special tokens in id order (the first gets id = number of mergeable ranks)."""
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + NUM_LLAMA3_SPECIAL - len(_LLAMA3_NAMED))]
    return list(_LLAMA3_NAMED) + reserved


Message = Dict[str, str]
Piece = Union[str, int]  # chat prompts are built as text pieces and control-token ids


class Tokenizer:
    """Common interface; subclasses implement `_encode_text`, `decode`, `token_id`, `token_str`."""

    path: str
    bos_id: Optional[int]
    eos_id: Optional[int]
    vocab_size: int
    chat_template: Optional[str] = None
    template_tokens: Dict[str, str] = {}
    extra_stop_ids: Tuple[int, ...] = ()  # e.g. generation_config.json's eos_token_id list

    def _encode_text(self, text: str) -> List[int]:
        raise NotImplementedError

    def _encode_with_specials(self, text: str) -> List[int]:
        """Encode text in which the tokenizer's special-token strings (as a chat template writes them) are
        control tokens."""
        specials = self.special_tokens()
        if not specials:
            return self._encode_text(text)
        pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
        ids: List[int] = []
        for part in re.split(pattern, text):
            if part in specials:
                ids.append(specials[part])
            elif part:
                ids.extend(self._encode_text(part))
        return ids

    def special_tokens(self) -> Dict[str, int]:
        return {}

    def token_id(self, token: str) -> Optional[int]:
        return self.special_tokens().get(token)

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> List[int]:
        """text -> ids, with one BOS in front when `bos` and the EOS at the end when `eos`."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        ids = self._encode_text(text) if text else []
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @property
    def stop_ids(self) -> Tuple[int, ...]:
        """Tokens that end a generation: EOS, and for Llama 3 also end-of-turn and end-of-message."""
        stops = ([self.eos_id] if self.eos_id is not None else []) + list(self.extra_stop_ids)
        for name in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "</s>"):
            tid = self.token_id(name)
            if tid is not None:
                stops.append(tid)
        return tuple(dict.fromkeys(stops))

    # ---- chat ---------------------------------------------------------------------------------------
    @property
    def chat_format(self) -> str:
        """"template" (the checkpoint's own Jinja chat_template), "llama3" or "llama2"."""
        if self.chat_template:
            return "template"
        return "llama3" if self.token_id("<|start_header_id|>") is not None else "llama2"

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> List[int]:
        """Chat messages [{"role": "system"|"user"|"assistant", "content": str}, ...] -> prompt ids that end
        where the assistant's reply begins."""
        _check_messages(messages)
        if self.chat_format == "template":
            return self._encode_with_specials(self.render_chat(messages, add_generation_prompt))
        pieces = (_llama3_pieces if self.chat_format == "llama3" else _llama2_pieces)(self, messages,
                                                                                     add_generation_prompt)
        ids: List[int] = []
        for piece in pieces:
            ids.extend([piece] if isinstance(piece, int) else self._encode_text(piece))
        return ids

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The chat prompt as text, control tokens written out (what a chat template renders)."""
        _check_messages(messages)
        if self.chat_format == "template":
            return render_template(self.chat_template, messages, add_generation_prompt, self.template_tokens)
        pieces = (_llama3_pieces if self.chat_format == "llama3" else _llama2_pieces)(self, messages,
                                                                                     add_generation_prompt)
        return "".join(p if isinstance(p, str) else self.token_str(p) for p in pieces)

    def token_str(self, token_id: int) -> str:
        for s, i in self.special_tokens().items():
            if i == token_id:
                return s
        return self.decode([token_id])

    def __repr__(self):
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


def _check_messages(messages):
    if not messages:
        raise ValueError("chat: messages is empty; expected [{'role': 'user', 'content': '...'}, ...]")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"chat: message {i} is {m!r}; expected a dict with 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant", "ipython", "tool"):
            raise ValueError(f"chat: message {i} has role {m['role']!r}; expected system, user or assistant")


def _llama3_pieces(tok: Tokenizer, messages, add_generation_prompt) -> List[Piece]:
    """Llama 3 instruct: <|begin_of_text|> then per message
    <|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>, then an open assistant header."""
    start, end, eot = (tok.token_id(t) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    pieces: List[Piece] = [tok.bos_id] if tok.bos_id is not None else []
    for m in messages:
        pieces += [start, m["role"], end, "\n\n" + m["content"].strip(), eot]
    if add_generation_prompt:
        pieces += [start, "assistant", end, "\n\n"]
    return pieces


def _llama2_pieces(tok: Tokenizer, messages, add_generation_prompt) -> List[Piece]:
    """Llama 2 chat: each exchange is <s>[INST] user [/INST] answer </s>; a system prompt is folded into the
    first user message between <<SYS>> markers."""
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    pieces: List[Piece] = []
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(f"Llama 2 chat: message {i} has role {m['role']!r}; roles must alternate "
                             "user/assistant after an optional system message")
        content = m["content"].strip()
        if m["role"] == "user":
            if i == 0 and system is not None:
                content = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{content}"
            pieces += ([tok.bos_id] if tok.bos_id is not None else []) + [f"[INST] {content} [/INST]"]
        else:
            pieces += [f" {content} "] + ([tok.eos_id] if tok.eos_id is not None else [])
    return pieces


def render_template(template: str, messages, add_generation_prompt: bool, tokens: Dict[str, str]) -> str:
    """Render a Hugging Face-style Jinja chat template in a sandbox (templates come with downloaded files)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        import datetime
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                **tokens)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template failed to render: {e}") from None


# ---- SentencePiece ----------------------------------------------------------------------------------
class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str):
        import sentencepiece as spm

        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a readable SentencePiece model ({e})") from None
        self.vocab_size = self.sp.GetPieceSize()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None

        self._specials = {self.sp.IdToPiece(i): i for i in range(self.vocab_size) if self.sp.IsControl(i)}

    def special_tokens(self) -> Dict[str, int]:
        return self._specials

    def token_id(self, token: str) -> Optional[int]:
        tid = self.sp.PieceToId(token)
        return tid if tid != self.sp.unk_id() or token == self.sp.IdToPiece(tid) else None

    def _encode_text(self, text: str) -> List[int]:
        return list(self.sp.EncodeAsIds(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids if 0 <= int(i) < self.vocab_size])


# ---- Meta's tiktoken format ---------------------------------------------------------------------------
def is_tiktoken_file(path: str) -> bool:
    """True when the file is text lines `<base64> <rank>` (Meta's Llama 3 format); SentencePiece models are
    binary protobufs."""
    with open(path, "rb") as f:
        head = f.read(4096)
    lines = head.split(b"\n")[:-1] or [head]
    return bool(lines) and all(re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", line.strip()) for line in lines[:20] if line)


def read_tiktoken_ranks(path: str) -> Dict[bytes, int]:
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError:
                raise TokenizerError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:60]!r}") from None
    return ranks


def _tiktoken_chunks(text: str, max_chars: int = 400_000, max_run: int = 25_000):
    """Cut very long text as Meta's reference does before tiktoken (whose regex engine can overflow on huge
    inputs): pieces of at most `max_chars`, and no run of only-space or only-non-space characters longer than
    `max_run` in one piece. Ordinary text passes through whole."""
    if len(text) <= max_run:
        yield text
        return
    long_run = re.compile(r"\s{%d,}|\S{%d,}" % (max_run + 1, max_run + 1))
    for start in range(0, len(text), max_chars):
        piece, begin = text[start:start + max_chars], 0
        for m in long_run.finditer(piece):
            for cut in range(m.start() + max_run, m.end(), max_run):
                yield piece[begin:cut]
                begin = cut
        yield piece[begin:]


class TiktokenTokenizer(Tokenizer):
    """Llama 3.x: BPE over bytes with Meta's split pattern; special tokens numbered after the ranks."""

    def __init__(self, path: str):
        import tiktoken

        self.path = path
        ranks = read_tiktoken_ranks(path)
        n = len(ranks)
        self._specials = {s: n + i for i, s in enumerate(llama3_special_tokens())}
        self.enc = tiktoken.Encoding(name=os.path.basename(path), pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=self._specials)
        self.vocab_size = n + len(self._specials)
        self.bos_id = self._specials["<|begin_of_text|>"]
        self.eos_id = self._specials["<|end_of_text|>"]

    def special_tokens(self) -> Dict[str, int]:
        return self._specials

    def _encode_text(self, text: str) -> List[int]:
        # Special-token strings in plain text stay plain text (disallowed_special=() stops tiktoken raising).
        return [i for chunk in _tiktoken_chunks(text)
                for i in self.enc.encode(chunk, allowed_special=set(), disallowed_special=())]

    def _encode_with_specials(self, text: str) -> List[int]:
        return [i for chunk in _tiktoken_chunks(text) for i in self.enc.encode(chunk, allowed_special="all")]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self._specials["<|begin_of_text|>"]]
        return self.enc.decode(ids)


# ---- Hugging Face tokenizer.json ----------------------------------------------------------------------
class HFTokenizer(Tokenizer):
    def __init__(self, path: str, tokenizer_config: Optional[dict] = None, model_config: Optional[dict] = None):
        import tokenizers

        self.path = path
        try:
            self.tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 - the library raises a bare Exception on bad JSON
            raise TokenizerError(f"{path}: not a readable Hugging Face tokenizer.json ({e})") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self._specials = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        tc, mc = tokenizer_config or {}, model_config or {}
        self.bos_id = self._resolve(tc.get("bos_token"), mc.get("bos_token_id"), ("<|begin_of_text|>", "<s>"))
        self.eos_id = self._resolve(tc.get("eos_token"), mc.get("eos_token_id"), ("<|end_of_text|>", "</s>"))

    def _resolve(self, token, config_id, fallbacks) -> Optional[int]:
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and self.tok.token_to_id(token) is not None:
            return self.tok.token_to_id(token)
        if isinstance(config_id, list) and config_id:
            config_id = config_id[0]
        if isinstance(config_id, int):
            return config_id
        for name in fallbacks:
            if self.tok.token_to_id(name) is not None:
                return self.tok.token_to_id(name)
        return None

    def special_tokens(self) -> Dict[str, int]:
        return self._specials

    def token_id(self, token: str) -> Optional[int]:
        return self.tok.token_to_id(token)

    def _encode_text(self, text: str) -> List[int]:
        # add_special_tokens=False: the post-processor would add its own BOS; encode() adds exactly one.
        self.tok.encode_special_tokens = True
        return self.tok.encode(text, add_special_tokens=False).ids

    def _encode_with_specials(self, text: str) -> List[int]:
        self.tok.encode_special_tokens = False
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


# ---- loading -------------------------------------------------------------------------------------------
def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: unreadable JSON ({e})") from None


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of a checkpoint or Hugging Face directory, or of a `tokenizer.model` / `tokenizer.json`
    file. A directory's `tokenizer_config.json` supplies the BOS/EOS names and a Jinja `chat_template`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TokenizerError(f"load_tokenizer: {path!r} does not exist")
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(path):
        candidates = [os.path.join(path, n) for n in ("tokenizer.json", "tokenizer.model")]
        found = [c for c in candidates if os.path.exists(c)]
        if not found:
            raise TokenizerError(f"load_tokenizer: {path!r} has neither tokenizer.model nor tokenizer.json "
                                 "(copy the checkpoint's tokenizer files into it)")
        # A tokenizer.model next to a tokenizer.json is the original: prefer it (exact reference behaviour).
        file = found[-1]
    else:
        file = path
    tc = _read_json(os.path.join(directory, "tokenizer_config.json"))
    if file.endswith(".json"):
        tok: Tokenizer = HFTokenizer(file, tc, _read_json(os.path.join(directory, "config.json")))
    elif is_tiktoken_file(file):
        tok = TiktokenTokenizer(file)
    else:
        tok = SentencePieceTokenizer(file)
    template = tc.get("chat_template")
    if template is None and os.path.isfile(os.path.join(directory, "chat_template.jinja")):  # newer transformers
        with open(os.path.join(directory, "chat_template.jinja"), encoding="utf-8") as f:
            template = f.read()
    if template is None:
        template = _read_json(os.path.join(directory, "chat_template.json")).get("chat_template")
    if isinstance(template, list):  # a list of named templates: take the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if isinstance(template, str) and template:
        tok.chat_template = template
        tokens = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = tc.get(key)
            tokens[key] = value.get("content") if isinstance(value, dict) else value
        for key, tid in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id)):
            if tokens.get(key) is None and tid is not None:
                tokens[key] = tok.token_str(tid)
        tok.template_tokens = tokens
    eos = _read_json(os.path.join(directory, "generation_config.json")).get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else []
    tok.extra_stop_ids = tuple(int(e) for e in eos if isinstance(e, int) and 0 <= e < tok.vocab_size)
    return tok
