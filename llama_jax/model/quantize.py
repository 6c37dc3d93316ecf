"""Weight-only quantization: int8 (sampling, and QLoRA's 8-bit base) and NF4 (QLoRA's 4-bit base).

int8: the big matmul weights stored as int8 with one float32 scale per output channel (symmetric,
absmax / 127). NF4 (`NF4Array`): 4-bit NormalFloat codes as in the QLoRA paper (Dettmers et al. 2023), two per
byte (uint4), with one float32 absmax per block of 64 values along the weight's last axis. Both are dequantized layer by
layer inside the model.

`QArray` is a pytree that stands in for a weight in the param tree. The model reads every weight through
`param(...).astype(compute_dtype)`; `QArray.astype` dequantizes there, so under `nn.scan` only one layer's
weights are ever widened at a time and the stored tree is about half the bytes of bf16. Norms and the token
embedding (a gather, not a matmul) stay in their original dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax.model import spec

# param path -> the axes summed over in its matmul (one scale per remaining index = per output channel): the
# spec's int8 candidates, e.g. layers/attn/o [L, N, H, D] -> (1, 2)
_REDUCED_AXES = {p.path: p.reduced_axes() for p in spec.ALL_PARAMS if p.quantize}


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


KINDS = ("int8", "nf4")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"quantize: kind={kind!r}, expected one of {KINDS}")


def quantize_weight(w: jax.Array, path: Tuple[str, ...], kind: str = "int8"):
    """One parameter at `path` (e.g. ("layers", "attn", "q")) quantized as `quantize_params` would (unchanged
    when the spec does not quantize it)."""
    _check_kind(kind)
    axes = _REDUCED_AXES.get(tuple(path))
    if axes is None:
        return w
    if path[0] == "layers" and 0 not in axes:
        # Stacked [L, ...]: one layer at a time, so the float32 temporaries are one layer's, not the stack's
        # (a 70B MLP stack quantized whole needs 43 GiB of temporaries per v5e chip; layer by layer, ~0.5).
        # Scales and blocks never span layers, so the result is the same.
        inner = tuple(a - 1 for a in axes)
        return jax.lax.map(lambda layer: quantize(layer, inner) if kind == "int8" else quantize_nf4(layer), w)
    return quantize(w, axes) if kind == "int8" else quantize_nf4(w)


def quantize_params(params: dict, shardings: Optional[dict] = None, kind: str = "int8") -> dict:
    """The param tree with its big matmul weights replaced by QArrays (`kind="int8"`) or NF4Arrays ("nf4").
    With `shardings` (a tree of NamedSharding, e.g. `sharding.param_shardings`), the result stays sharded the
    same way (scales are split like their weights, except where an axis is reduced or too short to split)."""
    _check_kind(kind)

    fn = lambda p: jax.tree_util.tree_map_with_path(lambda k, w: quantize_weight(w, _path_key(k), kind), p)  # noqa: E731
    if shardings is None:
        return jax.jit(fn)(params)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    return jax.jit(fn, out_shardings=quantized_shardings(shardings, kind, shapes))(params)


def quantized_shapes(shapes: dict, kind: str = "int8") -> dict:
    """`quantize_params`' output as ShapeDtypeStructs, from the float tree's (nothing is allocated)."""
    _check_kind(kind)
    return jax.eval_shape(lambda p: quantize_params(p, kind=kind), shapes)


def quantized_shardings(shardings: dict, kind: str = "int8", shapes: Optional[dict] = None) -> dict:
    """Shardings for `quantize_params`' output, from the float param shardings (`shapes`, the float tree's
    shapes, is needed for "nf4": a scale axis that the blocks make too short to split stays whole)."""
    _check_kind(kind)
    if kind == "nf4" and shapes is None:
        raise ValueError("quantized_shardings: kind='nf4' needs the float tree's shapes")

    def one(path, s: NamedSharding, shape=None):
        axes = _REDUCED_AXES.get(_path_key(path))
        if axes is None:
            return s
        if kind == "int8":
            # A spec may be shorter than the rank (trailing axes unsplit); only its entries need rewriting.
            scale_spec = PartitionSpec(*(None if i in axes else a for i, a in enumerate(s.spec)))
            return QArray(s, NamedSharding(s.mesh, scale_spec))
        q = jax.eval_shape(quantize_nf4, jax.ShapeDtypeStruct(shape.shape, jnp.float32))
        return NF4Array(s, _fitted(s, q.scale.shape))

    if shapes is None:
        return jax.tree_util.tree_map_with_path(one, shardings)
    return jax.tree_util.tree_map_with_path(one, shardings, shapes)


def _fitted(s: NamedSharding, shape) -> NamedSharding:
    """`s` with every axis whose length its mesh axes do not divide left whole."""

    def size(entry):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        return math.prod(s.mesh.shape[n] for n in names)

    spec = [a if a is None or shape[i] % size(a) == 0 else None for i, a in enumerate(s.spec)]
    return NamedSharding(s.mesh, PartitionSpec(*spec))


# ---------------------------------------------------------------------------------------------- NF4
# The 16 NormalFloat-4 levels: quantiles of N(0, 1) scaled to [-1, 1] with an exact zero (the QLoRA paper's
# Appendix E; the values bitsandbytes uses).
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
NF4_BLOCK = 64  # values per absmax scale, as in the paper: 4 + 32/64 = 4.5 bits per weight


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NF4Array:
    """NF4 weight [..., n]: `codes` uint4 [..., n] (indices into NF4_LEVELS; XLA stores uint4 two per byte, on
    TPU and CPU alike) and `scale` float32 [..., n/block] (each block's absmax): w ≈ NF4_LEVELS[code] * scale.
    The codes keep the weight's shape, so Flax's parameter shape check and the weight's sharding hold as they
    are; slicing leading axes (nn.scan over layers) keeps it valid, as the blocks run along the last axis."""

    codes: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> Tuple[int, ...]:
        return self.codes.shape

    @property
    def ndim(self) -> int:
        return self.codes.ndim

    @property
    def dtype(self):
        return self.codes.dtype

    def astype(self, dtype) -> jax.Array:
        """Dequantize into `dtype` (the model's compute dtype)."""
        values = jnp.asarray(NF4_LEVELS, jnp.float32)[self.codes.astype(jnp.int32)]  # [..., n]
        blocks = values.reshape(self.scale.shape + (-1,)) * self.scale[..., None]  # [..., n/block, block]
        return blocks.reshape(self.shape).astype(dtype)


def nf4_block(n: int) -> int:
    """The block length for a last axis of `n`: NF4_BLOCK, or its largest divisor that divides n (tiny test
    models have a head dim of 16)."""
    return math.gcd(NF4_BLOCK, n)


def quantize_nf4(w: jax.Array) -> NF4Array:
    """w [..., n] -> NF4Array: each block of `nf4_block(n)` values along the last axis is divided by its
    absmax and rounded to the nearest NF4 level."""
    n = w.shape[-1]
    block = nf4_block(n)
    blocks = w.astype(jnp.float32).reshape(w.shape[:-1] + (n // block, block))
    scale = jnp.max(jnp.abs(blocks), axis=-1)  # [..., n/block]
    scale = jnp.where(scale == 0, 1.0, scale)  # an all-zero block stays zero instead of dividing by 0
    levels = jnp.asarray(NF4_LEVELS, jnp.float32)
    # nearest level = number of midpoints below the value (searchsorted keeps memory at the weight's size)
    codes = jnp.searchsorted((levels[1:] + levels[:-1]) / 2, blocks / scale[..., None])
    return NF4Array(codes.reshape(w.shape).astype(jnp.uint4), scale)


def is_quantized(x) -> bool:
    return isinstance(x, (QArray, NF4Array))


def tree_bytes(tree) -> int:
    """Bytes held by the arrays of a pytree (QArrays and NF4Arrays count their codes and their scales; uint4
    codes count half a byte, as XLA stores them)."""
    return sum(x.size * jax.dtypes.itemsize_bits(x.dtype) // 8 for x in jax.tree_util.tree_leaves(tree))
