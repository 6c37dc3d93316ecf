"""Token files and the grain pipeline that packs them into training batches.

Token directory layout (written by `python -m llama_jax.data prepare` or `corpus.ensure_default_corpus`):
    meta.json            {"format", "dtype", "vocab_size", "bos_id", "eos_id", "splits": {name: {...}}}
    tokenizer.*          the tokenizer files the tokens came from (copied, so the directory is self-contained)
    {split}.bin          every document's tokens, flat: BOS doc EOS BOS doc EOS ... (uint16 or uint32)
    {split}.docs.npy     int64 [num_docs] the offset where each document starts in {split}.bin
    {split}.mask.bin     uint8, only for chat data: 1 where a token is a target the loss trains on

Packing: the flat stream is cut into rows of T+1 tokens that overlap by one (row i = tokens[iT : iT+T+1]);
inputs are the first T, targets the last T. Each row carries segment ids (1, 2, ... per document piece)
and positions that restart at 0 in every document piece, so attention never crosses documents. A target
in another document than its input (EOS -> next BOS) and, for chat data, a prompt token, gets loss_mask 0.

Order: a grain MapDataset of sequences, shuffled by the seed (a new order every epoch); global batch s is
sequences s*B .. s*B+B-1 of that order, and each process reads only its own rows of it (the rows its
devices hold), so one process of 8 devices sees the same global batches as two of 4. The iterator's state
(grain `get_state`: the next step) is saved with each checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional

import numpy as np

from llama_jax.errors import DataError, LlamaJaxError, TokenizerError
from llama_jax.io.source import copy_files

FORMAT = "llama_jax-tokens-v1"


# ---------------------------------------------------------------------------------------------- tokenizer
def load_text_tokenizer(path: str):
    """A tokenizer from a `tokenizer.model` file or a checkpoint directory (via `llama_jax.load_tokenizer`
    when the package has it; a plain SentencePiece file otherwise), or hf://ORG/NAME on the Hugging Face Hub."""
    from llama_jax.io import paths
    from llama_jax.io.hub import resolve

    # gs://: the tokenizer file, or a directory's tokenizer files, copied once into the local cache
    path = paths.local_copy(path, None if paths.isfile(path) else TOKENIZER_FILES) if paths.is_remote(path) \
        else resolve(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: tokenizer not found (expected a tokenizer.model file or a checkpoint directory)")
    from llama_jax.text.tokenizer import load_tokenizer
    try:
        return load_tokenizer(path)
    except TokenizerError as e:
        raise DataError(str(e)) from None


def _bos(tok) -> Optional[int]:
    return getattr(tok, "bos_id", None)


def _eos(tok) -> int:
    eos = getattr(tok, "eos_id", None)
    return eos if eos is not None else list(getattr(tok, "stop_ids"))[0]


def encode_record(record: Mapping[str, Any], tokenizer, where: str = "record"):
    """One input record -> (tokens, loss mask) as int lists.

    {"text": ...} -> BOS text EOS, every token trained. Chat records train only on the assistant's replies:
    {"prompt", "completion"} (one user turn and its answer) or {"messages": [{"role", "content"}, ...]}.
    They are rendered with the tokenizer's own chat format (`encode_chat`: Llama 2 [INST], Llama 3 headers
    or the checkpoint's template); a reply's tokens are those between the prompt that asks for it and the
    conversation that includes it, end-of-turn token included. Tokenizers without `encode_chat` fall back
    to plain "role: content" turns.
    """
    if "text" in record:
        toks = tokenizer.encode(str(record["text"]), bos=True, eos=True)
        return toks, [0] + [1] * (len(toks) - 1)
    if "prompt" in record and "completion" in record:
        messages = [{"role": "user", "content": str(record["prompt"])},
                    {"role": "assistant", "content": str(record["completion"])}]
    elif "messages" in record:
        messages = record["messages"]
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
    else:
        raise DataError(f"{where}: expected a 'text', 'prompt'+'completion' or 'messages' field, found "
                        f"{sorted(record)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: a chat record needs at least one assistant message to train on")
    if hasattr(tokenizer, "encode_chat"):
        return _encode_chat(messages, tokenizer, where)
    return _encode_plain_chat(messages, tokenizer)


def _encode_chat(messages, tokenizer, where):
    try:
        full = tokenizer.encode_chat(messages, add_generation_prompt=False)
        mask = [0] * len(full)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = tokenizer.encode_chat(messages[:i], add_generation_prompt=True)
            upto = tokenizer.encode_chat(messages[:i + 1], add_generation_prompt=False)
            if full[:len(upto)] != upto or upto[:len(prompt)] != prompt:
                raise DataError(f"{where}: the chat format does not render turn by turn (a prefix of the "
                                "conversation renders differently), so prompt tokens cannot be masked")
            mask[len(prompt):len(upto)] = [1] * (len(upto) - len(prompt))
    except DataError:
        raise
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    return full, mask


def _encode_plain_chat(messages, tokenizer):
    bos, eos = _bos(tokenizer), _eos(tokenizer)
    toks, mask = ([bos], [0]) if bos is not None else ([], [])

    def add(text, train, end=False):
        ids = tokenizer.encode(text, bos=False, eos=False) + ([eos] if end else [])
        toks.extend(ids)
        mask.extend([int(train)] * len(ids))

    for m in messages:
        if m["role"] == "assistant":
            add("assistant: ", False)
            add(str(m["content"]), True, end=True)
        else:
            add(f"{m['role']}: {m['content']}\n", False)
    return toks, mask


# ---------------------------------------------------------------------------------------------- writing
class SplitWriter:
    """The token files of a prepared directory, written as documents arrive: `{split}.bin` (ids),
    `{split}.mask.bin` (1 = scored), `{split}.docs.npy` (document starts) for "train" and "val", and the
    meta.json that marks the directory complete (`finish`, last). Shared by plain and preference data."""

    SPLITS = ("train", "val")

    def __init__(self, out_dir: str, tokenizer):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.tokenizer = out_dir, tokenizer
        self.vocab = int(tokenizer.vocab_size)
        self.dtype = np.uint16 if self.vocab <= 65536 else np.uint32
        self.files = {s: open(os.path.join(out_dir, f"{s}.bin"), "wb") for s in self.SPLITS}
        self.masks = {s: open(os.path.join(out_dir, f"{s}.mask.bin"), "wb") for s in self.SPLITS}
        self.starts = {s: [] for s in self.SPLITS}
        self.count = {s: 0 for s in self.SPLITS}
        self.top = {s: -1 for s in self.SPLITS}  # the largest id of each split, checked when a run starts

    def add(self, split: str, toks, mask) -> None:
        self.starts[split].append(self.count[split])
        self.count[split] += len(toks)
        self.top[split] = max(self.top[split], max(toks, default=-1))
        self.files[split].write(np.asarray(toks, self.dtype).tobytes())
        self.masks[split].write(np.asarray(mask, np.uint8).tobytes())

    def close(self) -> None:
        for f in list(self.files.values()) + list(self.masks.values()):
            f.close()

    def finish(self, keep_masks: bool, source: str, split_extra=None, **meta) -> dict:
        """Write the document starts, drop the masks when nothing is masked, copy the tokenizer files, then
        meta.json (extra keys from `meta`; `split_extra(split_dict)` adds keys to each split's); returns it."""
        splits = {}
        for s in self.SPLITS:
            np.save(os.path.join(self.out_dir, f"{s}.docs.npy"), np.asarray(self.starts[s], np.int64))
            if not keep_masks:
                os.remove(os.path.join(self.out_dir, f"{s}.mask.bin"))
            splits[s] = {"tokens": self.count[s], "docs": len(self.starts[s]), "max_id": int(self.top[s])}
            splits[s].update(split_extra(splits[s]) if split_extra else {})
        tok_path = getattr(self.tokenizer, "path", None)
        if tok_path and os.path.isfile(tok_path):
            copy_tokenizer_files(os.path.dirname(os.path.abspath(tok_path)), self.out_dir,
                                 os.path.basename(tok_path))
        out = {"format": FORMAT, "dtype": np.dtype(self.dtype).name, "vocab_size": self.vocab,
               "bos_id": _bos(self.tokenizer), "eos_id": _eos(self.tokenizer), "source": source, "splits": splits,
               **meta}
        with open(os.path.join(self.out_dir, "meta.json"), "w") as f:  # last: marks a complete directory
            json.dump(out, f, indent=1)
        return out


def write_token_files(out_dir: str, records: Iterable[Mapping[str, Any]], tokenizer, val_every: int = 100,
                      source: str = "", total: Optional[int] = None, progress: bool = True) -> dict:
    """Tokenize `records` into `out_dir` (every `val_every`-th document goes to the "val" split).

    Streams to disk, so memory does not grow with the data. Returns the meta dict it wrote last.
    """
    from tqdm import tqdm

    writer = SplitWriter(out_dir, tokenizer)
    any_masked = False
    try:
        for i, rec in enumerate(tqdm(records, total=total, desc="tokenizing", unit="doc", disable=not progress)):
            toks, mask = encode_record(rec, tokenizer, where=f"document {i}")
            writer.add("val" if val_every and i % val_every == val_every - 1 else "train", toks, mask)
            any_masked |= not all(mask[1:])
    finally:
        writer.close()
    return writer.finish(any_masked, source, masked=any_masked)


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json",
                   "preprocessor_config.json", "processor_config.json")  # Llama 3.2 Vision's image settings


def copy_tokenizer_files(src_dir: str, dst_dir: str, main_file: Optional[str] = None) -> None:
    """Copy the tokenizer files of `src_dir` (the model file, and the configs that carry special tokens and
    chat templates) into `dst_dir`; with `main_file`, only that one of tokenizer.model / tokenizer.json."""
    if os.path.realpath(src_dir) == os.path.realpath(dst_dir):
        return
    names = [n for n in TOKENIZER_FILES if os.path.lexists(os.path.join(src_dir, n))
             and not (main_file and n in ("tokenizer.model", "tokenizer.json") and n != main_file)]
    copy_files(src_dir, dst_dir, names)  # refuses a link that leaves src_dir (io/source.py: inside)


def has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.model", "tokenizer.json"))


def read_meta(path: str) -> dict:
    """The meta.json of a token directory, with a clear error when it is missing or of another format."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        raise DataError(f"{path}: not a token directory (no meta.json); make one with "
                        "`python -m llama_jax.data prepare --tokenizer TOK --out DIR FILES...`")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise DataError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def max_token_id(path: str, split: str, meta: dict) -> int:
    """The largest token id in `{split}.bin` (-1 when empty): the one meta.json recorded at prepare time while
    the file still holds the number of tokens recorded with it, else read from the file (memory-mapped, 64M
    tokens at a time; data prepared before the id was recorded, or a file changed since)."""
    info = meta.get("splits", {}).get(split, {})
    bin_path = os.path.join(path, f"{split}.bin")
    size = os.path.getsize(bin_path) if os.path.isfile(bin_path) else -1
    if info.get("max_id") is not None and size == info.get("tokens", -1) * np.dtype(meta["dtype"]).itemsize:
        return int(info["max_id"])
    tokens = np.memmap(bin_path, dtype=meta["dtype"], mode="r") if size > 0 else np.zeros(0, np.uint16)
    top, chunk = -1, 1 << 26
    for start in range(0, len(tokens), chunk):
        top = max(top, int(tokens[start:start + chunk].max()))
    return top


# ---------------------------------------------------------------------------------------------- reading
class PackedSequences:
    """Random-access grain source: row i of a split -> dict of [T] arrays (inputs, targets, segment_ids,
    positions int32; loss_mask float32). Reads only the T+1 tokens of the row (memory-mapped)."""

    def __init__(self, path: str, split: str, seq_len: int):
        meta = read_meta(path)
        if split not in meta["splits"]:
            raise DataError(f"{path}: no split {split!r}; splits are {sorted(meta['splits'])}")
        bin_path = os.path.join(path, f"{split}.bin")
        for p in (bin_path, os.path.join(path, f"{split}.docs.npy")):
            if not os.path.isfile(p):
                raise DataError(f"{p}: missing data file (listed in {path}/meta.json)")
        self.path, self.split, self.seq_len, self.meta = path, split, int(seq_len), meta
        self.tokens = np.memmap(bin_path, dtype=meta["dtype"], mode="r")
        self.starts = np.load(os.path.join(path, f"{split}.docs.npy"))
        mask_path = os.path.join(path, f"{split}.mask.bin")
        self.mask = np.memmap(mask_path, dtype=np.uint8, mode="r") if os.path.isfile(mask_path) else None
        if len(self) == 0:
            raise DataError(f"{bin_path}: {len(self.tokens)} tokens is less than one sequence of "
                            f"seq_len+1={seq_len + 1}")

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, i: int) -> Dict[str, np.ndarray]:
        t = self.seq_len
        lo = int(i) * t
        idx = np.arange(lo, lo + t + 1)
        row = np.asarray(self.tokens[lo:lo + t + 1]).astype(np.int32)
        doc = np.searchsorted(self.starts, idx, side="right") - 1  # [T+1] document of each token
        piece_start = np.maximum(self.starts[doc], lo)
        same_doc = doc[:-1] == doc[1:]
        loss_mask = same_doc.astype(np.float32)
        if self.mask is not None:
            loss_mask *= np.asarray(self.mask[lo + 1:lo + t + 1], np.float32)
        return {
            "inputs": row[:-1], "targets": row[1:],
            "segment_ids": (doc[:-1] - doc[0] + 1).astype(np.int32),
            "positions": (idx[:-1] - piece_start[:-1]).astype(np.int32),
            "loss_mask": loss_mask,
        }


def make_dataset(path: str, split: str, seq_len: int, global_batch: int, seed: int, rows=None,
                 shuffle: bool = True):
    """grain MapDataset: element s = this process's rows of global batch s, a dict of [len(rows), T] arrays.

    Global batch s is sequences s*B .. s*B+B-1 of the sequence order (shuffled by `seed`, a new order every
    epoch, endless; or file order, one pass, when not `shuffle`, for evaluation). `rows` are the rows of the
    global batch this process feeds (`distributed.process_batch_rows`; default all B): a process reads only
    those sequences, and the global batch is the same whatever the number of processes.
    """
    import grain

    src = grain.MapDataset.source(PackedSequences(path, split, seq_len))
    seqs = src.shuffle(seed=seed).repeat(None) if shuffle else src
    rows = np.arange(global_batch) if rows is None else np.asarray(rows, np.int64)
    if len(rows) == 0 or rows.min() < 0 or rows.max() >= global_batch:
        raise DataError(f"rows {rows.tolist()} are not rows of a batch of {global_batch}")
    steps = sys.maxsize // global_batch if shuffle else len(src) // global_batch

    def load(step: int) -> Dict[str, np.ndarray]:
        items = [seqs[step * global_batch + int(r)] for r in rows]
        return {k: np.stack([it[k] for it in items]) for k in items[0]}

    return grain.MapDataset.range(steps).map(load)


def make_iterator(dataset, state: Optional[dict] = None, threads: int = 2, prefetch: int = 4):
    """A grain iterator (prefetching in threads, order unchanged), positioned at `state` when given."""
    import grain

    it = iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)))
    if state is not None:
        it.set_state(state)
    return it


# ---------------------------------------------------------------------------------------------- CLI
def _read_inputs(paths, text_mode: str) -> Iterator[dict]:
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"{path}: input file not found")
        if path.endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except json.JSONDecodeError as e:
                            raise DataError(f"{path}:{n}: not valid JSON ({e})") from None
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if text_mode == "file":
                yield {"text": text}
            else:  # paragraphs separated by blank lines
                for para in text.split("\n\n"):
                    if para.strip():
                        yield {"text": para.strip()}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m llama_jax.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="tokenize .txt / .jsonl files into a token directory")
    p.add_argument("inputs", nargs="+", help=".txt files (documents = paragraphs or whole files) or .jsonl "
                   "records with 'text', 'prompt'+'completion' or chat 'messages'; or preference pairs for "
                   "DPO: 'prompt' (or 'messages') + 'chosen' + 'rejected'")
    p.add_argument("--tokenizer", required=True,
                   help="a checkpoint directory, a tokenizer.model file, or hf://ORG/NAME")
    p.add_argument("--out", required=True, help="output token directory")
    p.add_argument("--val-every", type=int, default=100, help="every N-th document goes to the val split")
    p.add_argument("--text-docs", choices=("paragraph", "file"), default="paragraph")
    # the old underscore spellings, accepted quietly (not in --help)
    p.add_argument("--val_every", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--text_docs", choices=("paragraph", "file"), default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        tok = load_text_tokenizer(args.tokenizer)
        from llama_jax.training import preference_data  # records with chosen/rejected: DPO pairs
        meta, records = preference_data.prepare(_read_inputs(args.inputs, args.text_docs), args.out, tok,
                                                args.val_every, " ".join(args.inputs))
        if meta is None:
            meta = write_token_files(args.out, records, tok, args.val_every, source=" ".join(args.inputs))
    except LlamaJaxError as e:  # the user's inputs: one line, no traceback
        sys.exit(f"error: {e}")
    print(json.dumps(meta["splits"]))


if __name__ == "__main__":
    main()
