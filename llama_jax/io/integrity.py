"""Checksums of stored arrays, so a flipped byte or a lost chunk in a checkpoint is named instead of loaded.

Orbax stores each array as zstd chunks without a checksum of their contents (its zarr3 layout checksums only
the shard index), and a missing chunk reads as the fill value. So llama_jax records one checksum per array when
it writes one (`llama_jax.json` "checksums" for a parameter checkpoint, the "config" item of a training
checkpoint) and recomputes it from what it read back (load, export, resume).

The checksum of an array x of n elements (bits b_i: x's bytes as an unsigned integer of its width, i the
flat C-order index, everything mod 2^32):

    sum_i fmix32(b_i ^ (i * 0x9E3779B1 + 0x7F4A7C15))

fmix32 (MurmurHash3's finaliser) is a bijection, so changing one element always changes the sum, and the
position term makes moved blocks count. It is a sum, so it splits over any partition of the array: the
converter adds it up block by block (numpy), a sharded jax.Array reduces it on its devices (one jitted pass,
no gather), and both give the same number. It guards against damage, not against a forger.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np

ALGORITHM = "fmix32-sum-v1"
_C_INDEX, _C_ADD = 0x9E3779B1, 0x7F4A7C15
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def _strides(shape: Sequence[int]) -> Tuple[int, ...]:
    """C-order element strides of `shape`, mod 2^32 (an index past 2^32 wraps: still a fine mixer)."""
    out, s = [], 1
    for n in reversed(shape):
        out.append(s % (1 << 32))
        s *= int(n)
    return tuple(reversed(out))


# ------------------------------------------------------------------------------------------------ numpy
def _np_fmix32(h: np.ndarray) -> np.ndarray:
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def block_checksum(block: np.ndarray, full_shape: Sequence[int], index: Tuple[slice, ...] = ()) -> int:
    """The contribution of `block` = full_array[index] (basic slices, step 1) to the full array's checksum."""
    block = np.ascontiguousarray(block)
    width = block.dtype.itemsize
    if width not in _UINT:
        raise ValueError(f"checksum: dtype {block.dtype} ({width} bytes) is not supported")
    index = tuple(index) + (slice(None),) * (len(full_shape) - len(index))
    starts = [s.indices(int(n))[0] for s, n in zip(index, full_shape)]
    strides = _strides(full_shape)
    with np.errstate(over="ignore"):
        if all(b == int(n) for b, n in zip(block.shape[1:], full_shape[1:])):
            # rows of the full array (a layer, a row block): the flat indices are one contiguous range, summed
            # in pieces that stay in the CPU's cache
            offset = (starts[0] * strides[0]) % (1 << 32) if block.ndim else 0
            bits, total, piece = block.reshape(-1).view(_UINT[width]), 0, 1 << 18
            for lo in range(0, max(bits.size, 1), piece):
                h = np.arange(lo, min(lo + piece, bits.size), dtype=np.uint32)
                h += np.uint32(offset)
                h *= np.uint32(_C_INDEX)
                h += np.uint32(_C_ADD)
                h ^= bits[lo:lo + piece]
                total += int(np.sum(_np_fmix32(h), dtype=np.uint32))
            return total % (1 << 32)
        else:
            flat = np.zeros((1,) * block.ndim, np.uint32)
            for d, (start, stride) in enumerate(zip(starts, strides)):
                shape = [1] * block.ndim
                shape[d] = block.shape[d]
                pos = (np.arange(block.shape[d], dtype=np.uint64) + start) * stride % (1 << 32)
                flat = flat + pos.astype(np.uint32).reshape(shape)
        h = flat * np.uint32(_C_INDEX)
        h += np.uint32(_C_ADD)
        h ^= block.view(_UINT[width])
        return int(np.sum(_np_fmix32(h), dtype=np.uint32))


def add(a: int, b: int) -> int:
    """Two partial checksums of one array combined."""
    return (a + b) % (1 << 32)


# ------------------------------------------------------------------------------------------------ jax
def _jax_checksum(x):
    import jax.numpy as jnp
    from jax import lax

    width = x.dtype.itemsize
    if width not in _UINT:
        raise ValueError(f"checksum: dtype {x.dtype} ({width} bytes) is not supported")
    bits = lax.bitcast_convert_type(x, jnp.dtype(_UINT[width])).astype(jnp.uint32)
    flat = jnp.zeros(x.shape, jnp.uint32)
    for d, stride in enumerate(_strides(x.shape)):
        flat = flat + lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride)
    h = bits ^ (flat * jnp.uint32(_C_INDEX) + jnp.uint32(_C_ADD))
    h ^= h >> 16
    h *= jnp.uint32(0x85EBCA6B)
    h ^= h >> 13
    h *= jnp.uint32(0xC2B2AE35)
    h ^= h >> 16
    return jnp.sum(h, dtype=jnp.uint32)


_JITTED = []


def _jitted():
    """One jitted function for every call (jax caches its compilations by the leaves' shapes and shardings)."""
    if not _JITTED:
        import jax
        _JITTED.append(jax.jit(lambda leaves: [_jax_checksum(x) for x in leaves]))
    return _JITTED[0]


def leaf_name(path) -> str:
    """'params/layers/attn/q' from a jax tree path (dict keys, sequence indices, attribute names)."""
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
    return "/".join(parts)


def tree_checksums(tree) -> Dict[str, int]:
    """{leaf name: checksum} of a tree of jax.Arrays (sharded over any mesh, any number of processes: each
    device reduces its own shard, and the scalar results are replicated)."""
    import jax

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not flat:
        return {}
    names = [leaf_name(p) for p, _ in flat]
    sums = _jitted()([x for _, x in flat])
    from llama_jax.parallel.distributed import to_host

    return {n: int(to_host(s)) for n, s in zip(names, sums)}


def mismatches(expected: Dict[str, int], actual: Dict[str, int]) -> list:
    """Leaf names whose checksum differs (or that one side lacks), in order."""
    return sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
