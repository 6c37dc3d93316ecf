"""Grouped-query attention with RoPE, an explicit KV cache passed in and returned, and boolean masks.

Legend: B batch, T query length, S key length, D model dim, N query heads, K kv heads, G = N/K, H head dim.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.config import LlamaConfig
from llama_jax.model.layers import dense, dtype_of, spec_param
from llama_jax.model.rope import apply_rotary
from llama_jax.model.splash import splash_attention

KVCache = dict  # {"k": [B, K, H, S], "v": [B, K, S, H]} for one layer; stacked [L, ...] in the model.
# Each in the layout its attention product reads as it lies (q k: [H, S] keys; p v: [S, H] values), so a decode
# step never copies the cache. Stored [B, S, K, H], every layer transposed its keys and values at every step
# (17% of a batch-8 decode step on a CPU); keys stored [B, K, S, H] were still copied to [H, S] (6% at batch 1).
SLOT_AXIS = {"k": -1, "v": -2}  # the slot (S) axis of each cache array, whatever leads it ([L], [B])


def write_slots(cache: dict, new: dict, index) -> dict:
    """`cache` with the new keys/values `new` (k [..., H, T], v [..., T, H]) written at slots
    index..index+T-1."""
    out = {}
    for name in cache:
        start = [jnp.zeros((), jnp.int32)] * cache[name].ndim
        start[SLOT_AXIS[name]] = jnp.asarray(index, jnp.int32)
        out[name] = jax.lax.dynamic_update_slice(cache[name], new[name].astype(cache[name].dtype), tuple(start))
    return out


def causal_mask(segment_ids: Optional[jnp.ndarray], batch: int, length: int) -> jnp.ndarray:
    """Training/prefill-without-cache mask [B, T, S=T]: causal, and never across packed documents."""
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None]
    if segment_ids is None:
        return jnp.broadcast_to(causal, (batch, length, length))
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal & same_doc


def cache_mask(cache_index: jnp.ndarray, kv_mask: jnp.ndarray, length: int) -> jnp.ndarray:
    """Mask [B, T, S] for T new tokens written at slots cache_index..cache_index+T-1 of a cache whose valid
    slots are kv_mask [B, S] (False for left padding and for slots not yet written). `cache_index`: one slot
    for every row, or one per row [B] (the paged decode cache, model/decode_kernel.py)."""
    slots = jnp.arange(kv_mask.shape[1])
    query_slots = jnp.reshape(cache_index, (-1, 1)) + jnp.arange(length)  # [1 or B, T]
    causal = slots <= query_slots[..., None]  # [1 or B, T, S]
    return causal & kv_mask[:, None, :]


def _masked_scores(q, k, mask):
    """q [B, T, K, G, H], k [B, K, H, S], mask [B, T, S] -> scaled float32 scores [B, K, G, T, S], masked."""
    # q transposed to [B, K, G, T, H] first (a small copy): left to itself XLA:CPU forms the [S, T] product
    # and transposes that whole matrix back, in a slow loop.
    scores = jnp.einsum("BKGTH,BKHS->BKGTS", q.transpose(0, 2, 3, 1, 4), k, preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(q.shape[-1] ** -0.5)
    return jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)


@jax.custom_vjp
def _attend(q, k, v, mask):
    """softmax(q k^T / sqrt(H), masked) v: q [B, T, K, G, H], k [B, K, H, S], v [B, K, S, H] -> [B, T, K, G, H]."""
    probs = jax.nn.softmax(_masked_scores(q, k, mask), axis=-1).astype(v.dtype)
    return _probs_times_values(probs, v)


def _probs_times_values(probs, v):
    """probs [B, K, G, T, S] times v [B, K, S, H] -> [B, T, K, G, H]. The product is formed as [B, K, G, T, H]
    and then transposed: asked for BTKGH directly, XLA:CPU computes the transposed product v^T probs^T and
    first transposes the whole [T, S] matrix, in a loop far slower than the matmul itself."""
    return jnp.einsum("BKGTS,BKSH->BKGTH", probs, v).transpose(0, 3, 1, 2, 4)


def _attend_fwd(q, k, v, mask):
    scores = _masked_scores(q, k, mask)  # [B, K, G, T, S]
    top = jnp.max(scores, axis=-1, keepdims=True)
    unnormalized = jnp.exp(scores - top)
    total = jnp.sum(unnormalized, axis=-1, keepdims=True)
    out = _probs_times_values((unnormalized / total).astype(v.dtype), v)
    # The row max and sum, not their log-sum-exp: a fully masked row (left padding) has max = float32 min,
    # where max + log(sum) rounds back to max and would turn its uniform probabilities into ones.
    return out, (q, k, v, mask, out, top[..., 0], total[..., 0])


def _attend_bwd(res, d_out):
    # Flash-attention's backward: the [T, S] probabilities are recomputed from q, k and the saved row max and
    # sum [B, K, G, T] rather than saved. Left to autodiff, every layer stores two [B, K, G, T, S] float32 arrays for the
    # backward pass (under nn.scan: stacked over layers, zero-filled and written every step), which on a CPU
    # costs more memory traffic than the attention matmuls themselves.
    q, k, v, mask, out, top, total = res
    f32 = jnp.float32
    probs = jnp.exp(_masked_scores(q, k, mask) - top[..., None]) / total[..., None]  # [B, K, G, T, S]
    # d_v and d_k contract over the query axis T: with the [T, S] matrix as the right operand, as it lies,
    # XLA:CPU transposes only the small [T, H] operand (the other way round it transposes [T, S] in a slow loop).
    d_v = jnp.einsum("BTKGH,BKGTS->BKHS", d_out.astype(v.dtype), probs.astype(v.dtype)).transpose(0, 1, 3, 2)
    d_probs = jnp.einsum("BTKGH,BKSH->BKGTS", d_out, v, preferred_element_type=f32)
    row = jnp.einsum("BTKGH,BTKGH->BKGT", d_out.astype(f32), out.astype(f32))  # sum_S probs * d_probs
    d_scores = probs * (d_probs - row[..., None])
    d_scores = jnp.where(mask[:, None, None, :, :], d_scores, 0.0) * f32(q.shape[-1] ** -0.5)
    d_q = jnp.einsum("BKGTS,BKHS->BKGTH", d_scores, k.astype(f32)).transpose(0, 3, 1, 2, 4)  # as in the forward
    d_k = jnp.einsum("BTKGH,BKGTS->BKHS", q.astype(f32), d_scores)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_attend.defvjp(_attend_fwd, _attend_bwd)


# Causal attention over inputs of CHUNKED_FROM tokens or more runs in blocks of QUERY_CHUNK query rows (see
# dot_product_attention). Measured on a 2-core CPU, bench-135m prefill of 4096 tokens: 19.9 s unblocked,
# 10.2 s in blocks of 1024, 9.4 s of 512, 8.6 s of 256; the bench-20m train step at 512 tokens: 1.60 s in one
# block, 1.50 s in two of 256.
QUERY_CHUNK = 256
CHUNKED_FROM = 512


def dot_product_attention(q, k, v, mask, causal_from_zero: bool = False) -> jnp.ndarray:
    """q [B, T, N, H], k [B, K, H, S], v [B, K, S, H], mask [B, T, S] -> [B, T, N, H]; softmax in float32.

    `causal_from_zero`: query t sits at key slot t (no cache, or a cache filled from slot 0) and the mask is
    causal, so query rows [i, i + c) see keys < i + c only. Long inputs then run in blocks of QUERY_CHUNK
    rows, each against just the keys it can see: half the [T, S] work, and blocks small enough to stay in
    cache. A row that sees no key at all (left padding) averages over its block's keys instead of over all
    S; such rows have no meaningful output either way and nothing attends to them.

    `mask` may instead be segment ids [B, T] (int32): `Llama` chose the splash kernel (see model/splash.py),
    which runs over the first T keys (the only ones written when queries start at slot 0)."""
    b, t, n, h = q.shape
    if mask.ndim == 2:
        return splash_attention(q, k[..., :t], v[:, :, :t], mask)
    kv = k.shape[1]
    q = q.reshape(b, t, kv, n // kv, h)  # [B, T, K, G, H]
    if not causal_from_zero or t < max(CHUNKED_FROM, 2 * QUERY_CHUNK):
        return _attend(q, k, v, mask).reshape(b, t, n, h)
    blocks = []
    for start in range(0, t, QUERY_CHUNK):
        end = min(start + QUERY_CHUNK, t)
        blocks.append(_attend(q[:, start:end], k[..., :end], v[:, :, :end], mask[:, start:end, :end]))
    return jnp.concatenate(blocks, axis=1).reshape(b, t, n, h)


def rotate(q, k, v, cos, sin):
    """RoPE on q [B, T, N, H] and k [B, T, K, H]; keys and values turned into the cache's layouts.
    Returns q [B, T, N, H], k [B, K, H, T], v [B, K, T, H]."""
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", "head_dim"))
    return q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)


def attend_and_project(q, k, v, mask, wo, from_zero: bool):
    """Attention over keys k [B, K, H, S] / values v [B, K, S, H], then the output projection wo [N, H, D]
    -> [B, T, D]. `from_zero`: see dot_product_attention's causal_from_zero."""
    out = dot_product_attention(q, k, v, mask, causal_from_zero=from_zero)  # [B, T, N, H]
    return dense(out, wo, contract=2)  # BTNH,NHD->BTD


def starts_at_zero(cache, cache_index) -> bool:
    """A static 0 (not a traced index): the sampler's prefill and every pass without a cache."""
    return cache is None or (isinstance(cache_index, int) and cache_index == 0)


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache: Optional[KVCache] = None, cache_index=None):
        """x [B, T, D]; cos/sin [B, T, H/2]; mask [B, T, S]. With a cache, the new keys/values are written at
        `cache_index` and attention runs over the whole cache. Returns (y [B, T, D], the new keys/values
        {"k": [B, K, H, T], "v": [B, K, T, H]} to write at cache_index, or None without a cache)."""
        dt = dtype_of(self.config.dtype)
        q = dense(x, spec_param(self, "layers/attn/q").astype(dt))  # BTD,DNH->BTNH
        k = dense(x, spec_param(self, "layers/attn/k").astype(dt))  # BTD,DKH->BTKH
        v = dense(x, spec_param(self, "layers/attn/v").astype(dt))
        wo = spec_param(self, "layers/attn/o").astype(dt)  # [N, H, D]
        q, k, v = rotate(q, k, v, cos, sin)  # [B, T, N, H], [B, K, H, T], [B, K, T, H]: the cache's layouts
        new_kv = None
        if cache is not None:
            # Under the layer scan, return only the T new keys/values: the caller writes them into the stacked
            # cache once, in place, instead of the scan stacking a second copy.
            new_kv = {"k": k.astype(cache["k"].dtype), "v": v.astype(cache["v"].dtype)}
            full = write_slots(cache, new_kv, cache_index)
            k, v = full["k"].astype(dt), full["v"].astype(dt)  # [B, K, H, S], [B, K, S, H]
        return attend_and_project(q, k, v, mask, wo, starts_at_zero(cache, cache_index)), new_kv
