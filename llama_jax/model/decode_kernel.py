"""Decode attention with a Pallas TPU kernel: `jax.experimental.pallas.ops.tpu.paged_attention` over a paged
view of the KV cache, for the Sampler's decode steps. `PagedLlama` is `Llama` over that cache.

Legend: B batch, T query length, S cache slots per row, D model dim, N query heads, K kv heads, H head dim,
L layers, P slots per page.

Which kernel (jax 0.10.2): `paged_attention` takes GQA (query head n reads kv head n // (N/K)) and one length
per row, and runs in Pallas interpret mode on a CPU (tests). `ragged_paged_attention` (the newer, mixed
prefill/decode kernel) needs H a multiple of 128 and does not run in interpret mode here (its ref reshape is
not interpretable), so nothing could test it off a TPU. `paged_attention` reads keys and values as bfloat16
(it rounds a float32 cache), so "auto" picks it for a bf16 cache only.

The cache (`init_paged_cache`): keys and values each one page pool [K, L, B, S, H], its logical axes
PAGED_CACHE_AXES. Reshaped to the kernel's [K, L·B·S/P, P, H] it is free (K leads, pages follow in order), so
row b of layer l owns pages (l·B + b)·S/P .. +S/P: pages over our slots, no page table to manage. Why not the
XLA cache ([L, B, K, H, S] keys): the kernel wants K leading and the head dim minor for keys and values alike,
and its lengths count slots from 0, so rows are *ragged* here: row b's prompt sits at slots 0..len_b-1 (not
left-padded to a common end) and each decode step writes row b at its own slot len_b + step - 1, which is also
its position. The whole pool is carried through the layer scan and written in place, so the kernel reads the
pool directly and no layer's cache is ever copied (a per-layer slice, written and then handed to a custom call,
would be).

Off a TPU the kernel runs in interpret mode (slow; tests use small shapes). On a mesh it runs per shard under
`shard_map` (parallel/decode_attention.py, installed by `use_mesh` through `sharded_by`), as splash does.
"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

from llama_jax.config import LlamaConfig
from llama_jax.errors import ConfigError
from llama_jax.model import spec
from llama_jax.model.attention import attend_and_project, rotate
from llama_jax.model.layers import MLP, RMSNorm, dense, dtype_of, spec_param
from llama_jax.model.splash import KernelHook, target_platform, warn_once
from llama_jax.model.transformer import Llama

# Mosaic tiles a page [P, H] over the TPU's 128 lanes: a head dim of 64 (Llama 3.2 1B) does not lower.
LANES = 128
PAGED_CACHE_AXES = {name: ("kv_heads", "layers", "cache_batch", "cache_length", "head_dim") for name in "kv"}
# Slots per page, largest first (one must divide S; the sampler's cache lengths are powers of two >= 8 or
# multiples of 512), and pages per kernel block: 128 x 4 = 512 keys per block, 128 lanes of the TPU per page.
PAGE_SIZES = (128, 64, 32, 16, 8)
PAGES_PER_BLOCK = 4

# (q [B, N, H], k/v pools [K, L, B, S, H], layer, lengths [B], interpret) -> [B, N, H] on the mesh in
# context; set by the parallel wing, None off a mesh.
_SHARDED = KernelHook("llama_jax_paged_sharded")
sharded_by = _SHARDED.set_to  # within the block, paged decode attention runs through fn (the shard_map wrapper)


def uses_paged(config: LlamaConfig) -> bool:
    """Whether the Sampler decodes with the kernel: decode_attention "paged", or "auto" compiling for a TPU with
    a bf16 cache (the kernel reads bf16), head_dim a multiple of LANES, and a text-only model (cross-attention
    layers are not paged)."""
    kind, tpu = config.decode_attention, target_platform() == "tpu"
    if kind == "auto":
        fits = config.dtype == "bfloat16" and config.head_dim % LANES == 0 and config.vision is None
        kind = "paged" if tpu and fits else "xla"
    if kind == "paged" and tpu and config.head_dim % LANES:
        raise ConfigError(f"LlamaConfig.decode_attention='paged': the TPU kernel needs head_dim a multiple of "
                          f"{LANES}; this model's is {config.head_dim} (use 'auto' or 'xla')")
    if kind == "paged" and config.dtype != "bfloat16" and config.decode_attention == "paged":
        warn_once(f"decode_attention='paged' with dtype={config.dtype}: the Pallas kernel reads the keys and "
                   f"values as bfloat16, so decoding is not exact in {config.dtype} (use 'xla' for that)")
    if kind == "paged" and config.vision is not None:
        raise ConfigError("LlamaConfig.decode_attention='paged': Llama 3.2 Vision's cross-attention layers have "
                          "no paged cache (use 'auto' or 'xla')")
    return kind == "paged"


def init_paged_cache(config: LlamaConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty paged cache: {"k", "v"}, each [K, L, B, S, H] (axes PAGED_CACHE_AXES), compute dtype."""
    dt = jnp.dtype(dtype) if dtype is not None else dtype_of(config.dtype)
    shape = (config.num_kv_heads, config.num_layers, batch, max_len, config.head_dim)
    return {name: jnp.zeros(shape, dt) for name in "kv"}


def page_size(slots: int) -> int:
    """Slots per page for a row of `slots`: the largest of PAGE_SIZES that divides it."""
    return next((p for p in PAGE_SIZES if slots % p == 0), slots)


def local_paged(q, k, v, layer, lengths, interpret: bool):
    """The kernel on one device: q [B, N, H] (already scaled), pools k/v [K, L, B, S, H], layer (scalar),
    lengths [B] (row b attends to its slots 0..lengths[b]-1) -> [B, N, H] float32."""
    kv, depth, batch, slots, h = k.shape
    size = page_size(slots)
    pages = slots // size
    per_block = next(c for c in (PAGES_PER_BLOCK, 2, 1) if pages % c == 0)
    k, v = (x.reshape(kv, depth * batch * pages, size, h) for x in (k, v))
    first = (layer * batch + jnp.arange(batch, dtype=jnp.int32)) * pages  # [B]: row b's first page
    page_indices = first[:, None] + jnp.arange(pages, dtype=jnp.int32)  # [B, S/P]
    run = lambda: paged_attention(q, k, v, lengths.astype(jnp.int32), page_indices,  # noqa: E731
                                  pages_per_compute_block=per_block)
    if not interpret:
        return run()
    with pltpu.force_tpu_interpret_mode():
        return run()


def paged_decode(q, pool: dict, layer, lengths) -> jnp.ndarray:
    """q [B, N, H] of one new token per row, pool {"k", "v"} [K, L, B, S, H], layer (scalar), lengths [B]
    -> softmax(q k / sqrt(H)) v over row b's slots 0..lengths[b]-1 of `layer`: [B, N, H] float32."""
    q = q.astype(jnp.float32) * jnp.float32(q.shape[-1] ** -0.5)  # the kernel does not scale
    run = _SHARDED.get() or local_paged
    return run(q, pool["k"], pool["v"], layer, lengths, interpret=target_platform() != "tpu")


def write_pages(pool: dict, new: dict, layer, cache_index) -> dict:
    """`pool` with `new` {"k", "v"} [K, B, T, H] written into `layer`: at slots 0..T-1 of every row when
    cache_index is a static 0 (prefill), else (T = 1) row b at its own slot cache_index[b]."""
    if isinstance(cache_index, int) and cache_index == 0:
        return {n: jax.lax.dynamic_update_slice_in_dim(pool[n], new[n][:, None].astype(pool[n].dtype), layer, axis=1)
                for n in pool}
    # One kv head at a time: written as one [K, H] slab per row, the token led XLA:TPU to lay the carried pool
    # out token-major ([L, B, S, K, H] in memory, K = 8 fills a tile) and copy the whole pool into the kernel's
    # K-major layout at every layer (Llama 3.2 3B, batch 1: 1.9 GB of temporaries; written per head: 0.3 MB).
    rows = jnp.arange(new["k"].shape[1])
    out = dict(pool)
    for n in pool:
        for head in range(pool[n].shape[0]):
            out[n] = out[n].at[head, layer, rows, cache_index].set(new[n][head, :, 0].astype(pool[n].dtype))
    return out


class PagedAttention(nn.Module):
    """Attention's parameters and projections (model/attention.py), over the paged pool."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, pool: dict, layer, cache_index):
        """x [B, T, D]. Prefill (cache_index a static 0): the T new tokens attend among themselves (`mask`, as
        `Llama` made it) and are written at slots 0..T-1. Decode (T = 1, cache_index [B]): the token is written
        at row b's slot cache_index[b], then the kernel attends over slots 0..cache_index[b]. -> (y [B, T, D],
        the pool)."""
        dt = dtype_of(self.config.dtype)
        q = dense(x, spec_param(self, "layers/attn/q").astype(dt))  # BTD,DNH->BTNH
        k = dense(x, spec_param(self, "layers/attn/k").astype(dt))  # BTD,DKH->BTKH
        v = dense(x, spec_param(self, "layers/attn/v").astype(dt))
        wo = spec_param(self, "layers/attn/o").astype(dt)  # [N, H, D]
        q, k, v = rotate(q, k, v, cos, sin)  # [B, T, N, H], [B, K, H, T], [B, K, T, H]
        pool = write_pages(pool, {"k": k.transpose(1, 0, 3, 2), "v": v.transpose(1, 0, 2, 3)}, layer, cache_index)
        if isinstance(cache_index, int) and cache_index == 0:
            keys = mask[..., :x.shape[1]] if mask.ndim == 3 else mask  # boolean [B, T, S], or splash's segment ids
            # as stored (bf16 in a bf16 cache), like the XLA path's prefill, which reads them back from its cache
            k, v = (a.astype(pool["k"].dtype).astype(dt) for a in (k, v))
            return attend_and_project(q, k, v, keys, wo, from_zero=True), pool
        out = paged_decode(q[:, 0], pool, layer, cache_index + 1).astype(dt)  # [B, N, H]
        return dense(out[:, None], wo, contract=2), pool  # BTNH,NHD->BTD


class PagedBlock(nn.Module):
    """`transformer.Block` (same parameter names) with the pool in the scan's carry, written in place."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, carry, layer, cos, sin, mask, cache_index):
        cfg = self.config
        x, pool = carry
        h, pool = PagedAttention(cfg, name="attn")(
            RMSNorm(cfg, "layers/attn_norm/scale", name="attn_norm")(x), cos, sin, mask, pool, layer, cache_index)
        x = x + h
        x = x + MLP(cfg, name="mlp")(RMSNorm(cfg, "layers/mlp_norm/scale", name="mlp_norm")(x))
        return (nn.with_logical_constraint(x, ("batch", "length", "act_embed")), pool), None


class PagedLlama(Llama):
    """`Llama` (same parameters, stacked) over the paged cache (`init_paged_cache`): tokens of row b at slots
    0..len_b-1. Prefill: cache_index=0 with right-padded prompts; decode: one token per row, cache_index [B] its
    slots. Sampling only (no remat, no training)."""

    def blocks(self, x, cache, cos, sin, mask, cache_index):
        cfg = self.config
        stack = nn.scan(
            PagedBlock, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: spec.LAYERS})
        layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (x, cache), _ = stack(cfg, name=spec.LAYERS)((x, cache), layers, cos, sin, mask, cache_index)
        return x, cache
