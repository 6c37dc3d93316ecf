"""Streaming: token ids out of the compiled loop as they are drawn, and text pieces out of token ids.

The compiled loop calls `emit`, one module-level function (a new Python function per call would change the
traced program and recompile); it forwards to the sink of the call in progress, which `sink(on_token)` sets.
The runtime calls it from its own threads, so the sink is process-wide and calls that stream are serialised
by a lock.
"""

from __future__ import annotations

import contextlib
import threading
import types
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np

OnToken = Callable[[int, np.ndarray, np.ndarray], None]  # (step, tokens [B], done [B])

_sink = types.SimpleNamespace(fn=None)
_lock = threading.Lock()


def emit(step, tokens, done) -> None:
    """Called by `jax.debug.callback` inside the compiled loop: step scalar, tokens [B], done [B]."""
    fn = _sink.fn
    if fn is not None:
        fn(int(step), np.asarray(tokens), np.asarray(done))


@contextlib.contextmanager
def sink(on_token: Optional[OnToken]) -> Iterator[None]:
    """While inside, `emit` calls `on_token` (None: nothing streams, and nothing waits for the lock)."""
    with (_lock if on_token is not None else contextlib.nullcontext()):
        _sink.fn = on_token
        try:
            yield
        finally:
            _sink.fn = None


def decode_continuation(tokenizer, prefix: Sequence[int], new_ids: Sequence[int]) -> str:
    """The text of `new_ids` as it reads after `prefix`. SentencePiece drops a leading space when a piece
    starts the decoded text ("▁file" alone decodes to "file"), so decode prefix + new and remove the prefix."""
    if not prefix:
        return tokenizer.decode(list(new_ids))
    head = tokenizer.decode(list(prefix))
    text = tokenizer.decode(list(prefix) + list(new_ids))
    return text[len(head):] if text.startswith(head) else tokenizer.decode(list(new_ids))


class TextStream:
    """Turns streamed token ids of one row into text pieces for `write` (decoding the whole row each time so
    SentencePiece spaces and multi-byte characters come out right; a trailing partial character waits)."""

    def __init__(self, tokenizer, write: Callable[[str], None], stop_ids: Sequence[int],
                 prefix: Sequence[int] = ()):
        self.tokenizer, self.write, self.stop_ids = tokenizer, write, set(stop_ids)
        self.prefix = list(prefix)  # context tokens decoded with the row, so its first space survives
        self.ids: List[int] = []
        self.pending: dict = {}
        self.next_step, self.printed, self.finished = 0, "", False

    def __call__(self, step: int, tokens: np.ndarray, done: np.ndarray) -> None:
        self.pending[step] = int(tokens[0])
        while self.next_step in self.pending:  # callbacks may arrive out of order: emit in step order
            token = self.pending.pop(self.next_step)
            self.next_step += 1
            if self.finished or token in self.stop_ids:
                self.finished = True
                continue
            self.ids.append(token)
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        text = decode_continuation(self.tokenizer, self.prefix, self.ids)
        if not final and text.endswith("\ufffd"):
            return
        if text.startswith(self.printed):
            self.write(text[len(self.printed):])
        self.printed = text

    def close(self) -> None:
        self._flush(final=True)
