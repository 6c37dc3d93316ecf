"""Weight-only int8 for sampling: the big matmul weights stored as int8 with one float32 scale per output
channel (symmetric, absmax / 127), dequantized layer by layer inside the model.

`QArray` is a pytree that stands in for a weight in the param tree. The model reads every weight through
`param(...).astype(compute_dtype)`; `QArray.astype` dequantizes there, so under `nn.scan` only one layer's
weights are ever widened at a time and the stored tree is about half the bytes of bf16. Norms and the token
embedding (a gather, not a matmul) stay in their original dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax.model import spec

# param path -> the axes summed over in its matmul (one scale per remaining index = per output channel): the
# spec's int8 candidates, e.g. layers/attn/o [L, N, H, D] -> (1, 2)
_REDUCED_AXES = {p.path: p.reduced_axes() for p in spec.LLAMA if p.quantize}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
    """int8 values `q` and float32 `scale` (same rank, size 1 on the reduced axes): w ≈ q * scale."""

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> Tuple[int, ...]:
        return self.q.shape

    @property
    def ndim(self) -> int:
        return self.q.ndim

    @property
    def dtype(self):
        return self.q.dtype

    def astype(self, dtype) -> jax.Array:
        """Dequantize into `dtype` (the model's compute dtype)."""
        return (self.q.astype(jnp.float32) * self.scale).astype(dtype)


def quantize(w: jax.Array, reduced_axes: Tuple[int, ...]) -> QArray:
    """Symmetric int8 with one scale per output channel (max |w| over `reduced_axes` maps to 127)."""
    w = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=reduced_axes, keepdims=True) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)  # an all-zero channel stays zero instead of dividing by 0
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return QArray(q, scale)


def _path_key(path) -> Tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def quantize_params(params: dict, shardings: Optional[dict] = None) -> dict:
    """The param tree with its big matmul weights replaced by QArrays. With `shardings` (a tree of
    NamedSharding, e.g. `sharding.param_shardings`), the result stays sharded the same way (scales are
    split like their weights, except along the reduced axes where they have size 1)."""

    def one(path, w):
        axes = _REDUCED_AXES.get(_path_key(path))
        return quantize(w, axes) if axes is not None else w

    fn = lambda p: jax.tree_util.tree_map_with_path(one, p)  # noqa: E731
    if shardings is None:
        return jax.jit(fn)(params)
    return jax.jit(fn, out_shardings=quantized_shardings(shardings))(params)


def quantized_shardings(shardings: dict) -> dict:
    """Shardings for `quantize_params`' output, from the float param shardings."""

    def one(path, s: NamedSharding):
        axes = _REDUCED_AXES.get(_path_key(path))
        if axes is None:
            return s
        # A spec may be shorter than the rank (trailing axes unsplit); only its entries need rewriting.
        scale_spec = PartitionSpec(*(None if i in axes else a for i, a in enumerate(s.spec)))
        return QArray(s, NamedSharding(s.mesh, scale_spec))

    return jax.tree_util.tree_map_with_path(one, shardings)


def tree_bytes(tree) -> int:
    """Bytes held by the arrays of a pytree (QArrays count their int8 values and their scales)."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))
