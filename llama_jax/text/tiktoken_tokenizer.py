"""Meta's tiktoken-format `tokenizer.model` (Llama 3.x), through the `tiktoken` library.

The file is lines of `<base64 token> <rank>`; the split pattern and the 256 special tokens are not in it:
they are Meta's, written here, and the specials are numbered right after the mergeable ranks (128000.. for
Llama 3).
"""

from __future__ import annotations

import base64
import os
import re
from typing import Dict, Iterator, List, Sequence

from llama_jax.errors import TokenizerError
from llama_jax.text.base import Tokenizer

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


def is_tiktoken_file(path: str) -> bool:
    """True when the file is text lines `<base64> <rank>` (Meta's Llama 3 format); SentencePiece models are
    binary protobufs."""
    with open(path, "rb") as f:
        head = f.read(4096)
    lines = head.split(b"\n")[:-1] or [head]
    return bool(lines) and all(re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", line.strip()) for line in lines[:20] if line)


def read_tiktoken_ranks(path: str) -> Dict[bytes, int]:
    """{token bytes: rank} from a tiktoken file; a malformed line raises TokenizerError naming it."""
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


def _tiktoken_chunks(text: str, max_chars: int = 400_000, max_run: int = 25_000) -> Iterator[str]:
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
        # Special tokens decode to nothing (ids from the first special up are dropped), as skip_special_tokens.
        ids = [int(i) for i in ids if 0 <= int(i) < self._specials["<|begin_of_text|>"]]
        return self.enc.decode(ids)
