"""Preference pairs for DPO: `python -m llama_jax.data prepare` on records with "chosen" and "rejected", and
the grain pipeline that feeds them to `objective=dpo`.

Input records (.jsonl), one pair each:
    {"prompt": "...", "chosen": "...", "rejected": "..."}
    {"messages": [{"role", "content"}, ...], "chosen": ..., "rejected": ...}   (a chat before the reply)
A reply is a string, a message {"role": "assistant", "content": ...}, or a list of messages appended to the
prompt; only the last assistant reply is trained on (its tokens get mask 1, end-of-turn token included).

Token directory: the same files as SFT data (training/data.py) with meta "kind": "preference": documents
2p and 2p+1 of a split are pair p's chosen and rejected conversations (prompt + reply, rendered with the
tokenizer's chat format), and {split}.mask.bin marks the reply tokens.

Batches: one row per sequence, not packed; a global batch of B rows holds B/2 pairs, interleaved (row 2p
chosen, 2p+1 rejected, so both rows of a pair sit on the same device). A sequence longer than T+1 tokens
is cut at the end (its reply loses its tail); shorter ones are padded (segment 0, loss_mask 0).
"""

from __future__ import annotations

import itertools
import os
import sys
from typing import Any, Dict, Iterable, Mapping

import numpy as np

from llama_jax.errors import DataError
from llama_jax.training import data as data_lib

KIND = "preference"


def is_preference(record: Any) -> bool:
    return isinstance(record, Mapping) and "chosen" in record and "rejected" in record


def peek(records: Iterable[Any]):
    """(first record or None, an iterator over all records, the first included)."""
    it = iter(records)
    first = next(it, None)
    return first, (itertools.chain([first], it) if first is not None else iter(()))


def _reply_messages(reply: Any, where: str) -> list:
    if isinstance(reply, str):
        return [{"role": "assistant", "content": reply}]
    if isinstance(reply, Mapping) and "content" in reply:
        return [{"role": reply.get("role", "assistant"), "content": reply["content"]}]
    if isinstance(reply, list) and reply:
        return list(reply)
    raise DataError(f"{where}: expected a string, a message or a list of messages, found {type(reply).__name__}")


def _last_run(mask: list) -> list:
    """`mask` with only its last run of 1s kept (the final reply; earlier assistant turns are context)."""
    end = max((i for i, m in enumerate(mask) if m), default=-1) + 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return [int(start <= i < end) for i in range(len(mask))]


def encode_pair(record: Mapping[str, Any], tokenizer, where: str = "record"):
    """A preference record -> ((chosen tokens, mask), (rejected tokens, mask)): prompt + reply each."""
    if "prompt" in record:
        prompt = [{"role": "user", "content": str(record["prompt"])}]
    elif "messages" in record and isinstance(record["messages"], list):
        prompt = list(record["messages"])
    else:
        raise DataError(f"{where}: a preference record needs 'prompt' (a string) or 'messages' (a list) besides "
                        f"'chosen' and 'rejected'; found {sorted(record)}")
    out = []
    for side in ("chosen", "rejected"):
        messages = prompt + _reply_messages(record[side], f"{where}: '{side}'")
        toks, mask = data_lib.encode_record({"messages": messages}, tokenizer, where=f"{where} ({side})")
        mask = _last_run(mask)
        if not any(mask):
            raise DataError(f"{where}: '{side}' has no reply tokens to score")
        out.append((toks, mask))
    return tuple(out)


def write_preference_files(out_dir: str, records: Iterable[Mapping[str, Any]], tokenizer, val_every: int = 100,
                           source: str = "", progress: bool = True) -> dict:
    """Tokenize preference records into `out_dir` (every `val_every`-th pair goes to "val"); returns meta."""
    from tqdm import tqdm

    writer = data_lib.SplitWriter(out_dir, tokenizer)
    longest = 0
    try:
        for i, rec in enumerate(tqdm(records, desc="tokenizing", unit="pair", disable=not progress)):
            where = f"record {i}"
            if not is_preference(rec):
                raise DataError(f"{where}: expected 'chosen' and 'rejected' like the first record; found "
                                f"{sorted(rec) if isinstance(rec, Mapping) else type(rec).__name__}")
            split = "val" if val_every and i % val_every == val_every - 1 else "train"
            for toks, mask in encode_pair(rec, tokenizer, where):
                writer.add(split, toks, mask)
                longest = max(longest, len(toks))
    finally:
        writer.close()
    return writer.finish(True, source, split_extra=lambda split: {"pairs": split["docs"] // 2}, kind=KIND,
                         masked=True, longest=longest)


def prepare(records: Iterable[Any], out_dir: str, tokenizer, val_every: int, source: str):
    """`python -m llama_jax.data prepare`'s hook -> (meta, None) after writing preference files when the
    first record is a pair; else (None, the records, untouched) for the caller to write as SFT data."""
    first, records = peek(records)
    if not is_preference(first):
        return None, records
    return write_preference_files(out_dir, records, tokenizer, val_every, source), None


class PreferencePairs:
    """Random-access grain source: pair i of a split -> dict of [2, T] arrays (chosen row, rejected row):
    inputs, targets, segment_ids, positions int32; loss_mask float32 (1 on the reply's target tokens)."""

    def __init__(self, path: str, split: str, seq_len: int):
        meta = data_lib.read_meta(path)
        if meta.get("kind") != KIND:
            raise DataError(f"{path}: not preference data (objective=dpo needs a directory written by `python -m "
                            "llama_jax.data prepare` from records with 'chosen' and 'rejected')")
        if split not in meta["splits"]:
            raise DataError(f"{path}: no split {split!r}; splits are {sorted(meta['splits'])}")
        bin_path = os.path.join(path, f"{split}.bin")
        for p in (bin_path, os.path.join(path, f"{split}.docs.npy"), os.path.join(path, f"{split}.mask.bin")):
            if not os.path.isfile(p):
                raise DataError(f"{p}: missing data file (listed in {path}/meta.json)")
        self.seq_len = int(seq_len)
        self.tokens = np.memmap(bin_path, dtype=meta["dtype"], mode="r")
        self.mask = np.memmap(os.path.join(path, f"{split}.mask.bin"), dtype=np.uint8, mode="r")
        starts = np.load(os.path.join(path, f"{split}.docs.npy"))
        if len(starts) % 2 or len(starts) == 0:
            raise DataError(f"{path}/{split}.docs.npy: {len(starts)} sequences, expected a positive even number "
                            "(chosen and rejected of each pair)")
        self.bounds = np.append(starts, len(self.tokens))

    def __len__(self) -> int:
        return (len(self.bounds) - 1) // 2

    def _row(self, j: int) -> Dict[str, np.ndarray]:
        t = self.seq_len
        lo, hi = int(self.bounds[j]), min(int(self.bounds[j + 1]), int(self.bounds[j]) + t + 1)
        n = hi - lo
        toks = np.zeros(t + 1, np.int32)
        mask = np.zeros(t + 1, np.float32)
        toks[:n] = self.tokens[lo:hi]
        mask[:n] = self.mask[lo:hi]
        real = (np.arange(t) < n - 1)  # input positions whose target is a real token
        return {"inputs": toks[:-1], "targets": toks[1:], "segment_ids": real.astype(np.int32),
                "positions": np.arange(t, dtype=np.int32), "loss_mask": mask[1:] * real}

    def __getitem__(self, i: int) -> Dict[str, np.ndarray]:
        rows = [self._row(2 * int(i)), self._row(2 * int(i) + 1)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def make_dataset(path: str, split: str, seq_len: int, global_batch: int, seed: int, rows=None,
                 shuffle: bool = True):
    """grain MapDataset like `data.make_dataset`'s: element s = this process's rows of global batch s, a dict
    of [len(rows), T] arrays; global batch s holds pairs s*B/2 .. (s+1)*B/2-1 of the pair order (shuffled by
    `seed`, a new order every epoch, endless; or file order, one pass, when not `shuffle`)."""
    import grain

    if global_batch % 2:
        raise DataError(f"a DPO batch holds pairs: batch size {global_batch} must be even")
    src = grain.MapDataset.source(PreferencePairs(path, split, seq_len))
    pairs = src.shuffle(seed=seed).repeat(None) if shuffle else src
    rows = np.arange(global_batch) if rows is None else np.asarray(rows, np.int64)
    if len(rows) == 0 or rows.min() < 0 or rows.max() >= global_batch:
        raise DataError(f"rows {rows.tolist()} are not rows of a batch of {global_batch}")
    half = global_batch // 2
    steps = sys.maxsize // global_batch if shuffle else len(src) // half

    def load(step: int) -> Dict[str, np.ndarray]:
        items = [{k: v[int(r) % 2] for k, v in pairs[step * half + int(r) // 2].items()} for r in rows]
        return {k: np.stack([it[k] for it in items]) for k in items[0]}

    return grain.MapDataset.range(steps).map(load)
