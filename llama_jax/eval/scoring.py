"""The compiled scoring program: the log-probability of each target token, for rows of (inputs, targets).

Legend: B batch (rows per call), T padded row length, V vocab.

Rows are sorted by length, cut into batches of `batch_size` rows and right-padded to a bucketed length
(`sampling.program.bucket`: powers of two up to 512, then multiples of 512), short batches padded with empty
rows: a whole evaluation compiles one program per length bucket, a handful, never one per request. Right
padding needs no mask: a causal model's logits at a real position never see the padding after it.
"""

from __future__ import annotations

import functools
from typing import Callable, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.errors import EvalError
from llama_jax.model.transformer import Llama
from llama_jax.sampling.program import bucket

Row = Tuple[Sequence[int], Sequence[int]]  # (inputs, targets): targets[i] is the token after inputs[i]


def token_scores(config: LlamaConfig, params, tokens: jax.Array, targets: jax.Array):
    """tokens, targets [B, T] int32 -> (log p(target | prefix) [B, T] float32, target is the argmax [B, T])."""
    logits = Llama(config).apply({"params": params}, tokens).astype(jnp.float32)  # [B, T, V]
    # log_softmax at the targets only: no second [B, T, V] array beside the logits
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
    return picked - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == targets


class Scorer:
    """`scorer(rows) -> [(log-probs [n], greedy [n]) per row]` for rows (inputs, targets) of n tokens each.

    With `mesh`, `params` should already be in their shardings (`Sampler` puts them there); each batch is
    split over the mesh's batch axes (`batch_size` is rounded up to a multiple of them) and the small
    [B, T] results come back replicated, so every process reads them.
    """

    def __init__(self, config: LlamaConfig, params, mesh=None, batch_size: int = 8):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise EvalError(f"batch_size={batch_size!r}: expected a positive number of rows per model call")
        self.config, self.params, self.mesh = config, params, mesh
        self.batch_size = batch_size
        if mesh is not None:
            from llama_jax.parallel.sharding import batch_shards

            shards = batch_shards(mesh)
            self.batch_size = -(-batch_size // shards) * shards
        self._fn = _compiled(config, mesh)

    def __call__(self, rows: Sequence[Row], on_batch: Optional[Callable[[int], None]] = None
                 ) -> List[Tuple[np.ndarray, np.ndarray]]:
        """`on_batch(n)` is called after each model call with the number of rows it scored (progress)."""
        out: List = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            logp, greedy = self._run([rows[i] for i in chunk])
            for j, i in enumerate(chunk):
                n = len(rows[i][0])
                out[i] = (logp[j, :n], greedy[j, :n])
            if on_batch is not None:
                on_batch(len(chunk))
        return out

    def _run(self, rows: Sequence[Row]):
        """One batch: rows padded to [batch_size, bucket(longest)] -> numpy (log-probs, greedy) [B, T]."""
        length = bucket(max(len(r[0]) for r in rows))
        tokens = np.zeros((self.batch_size, length), np.int32)
        targets = np.zeros((self.batch_size, length), np.int32)
        for j, (inputs, target) in enumerate(rows):
            if len(inputs) != len(target) or not len(inputs):
                raise EvalError(f"scoring row {j}: {len(inputs)} inputs and {len(target)} targets; expected the "
                                "same positive number")
            tokens[j, :len(inputs)], targets[j, :len(target)] = inputs, target
        if self.mesh is None:
            logp, greedy = self._fn(self.params, tokens, targets)
        else:  # every process holds the whole batch: each device takes its rows (works across hosts too)
            from llama_jax.parallel.sharding import batch_sharding, use_mesh

            rows = batch_sharding(self.mesh)
            tokens, targets = (jax.make_array_from_callback(x.shape, rows, lambda index, x=x: x[index])
                               for x in (tokens, targets))
            with use_mesh(self.mesh):
                logp, greedy = self._fn(self.params, tokens, targets)
        return np.asarray(jax.device_get(logp)), np.asarray(jax.device_get(greedy))


@functools.lru_cache(maxsize=None)
def _compiled(config: LlamaConfig, mesh):
    """The jitted `token_scores` of a config (and mesh): one per model, shared by every Scorer, so a new
    Scorer over the same model (the CLI after a notebook, a second evaluation) reuses its compiled buckets."""
    fn = functools.partial(token_scores, config)
    if mesh is None:
        return jax.jit(fn)
    from llama_jax.parallel.sharding import batch_sharding, param_shardings, replicated

    rows = batch_sharding(mesh)
    return jax.jit(fn, in_shardings=(param_shardings(config, mesh), rows, rows), out_shardings=replicated(mesh))
