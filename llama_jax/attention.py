"""Grouped-query attention with RoPE, an explicit KV cache passed in and returned, and boolean masks.

Legend: B batch, T query length, S key length, D model dim, N query heads, K kv heads, G = N/K, H head dim.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.config import LlamaConfig
from llama_jax.layers import dtype_of, kernel_init, param_with_axes
from llama_jax.rope import apply_rotary

KVCache = dict  # {"k": [B, S, K, H], "v": [B, S, K, H]} for one layer; stacked [L, ...] in the model


def causal_mask(segment_ids: Optional[jnp.ndarray], batch: int, length: int) -> jnp.ndarray:
    """Training/prefill-without-cache mask [B, T, S=T]: causal, and never across packed documents."""
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None]
    if segment_ids is None:
        return jnp.broadcast_to(causal, (batch, length, length))
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal & same_doc


def cache_mask(cache_index: jnp.ndarray, kv_mask: jnp.ndarray, length: int) -> jnp.ndarray:
    """Mask [B, T, S] for T new tokens written at slots cache_index..cache_index+T-1 of a cache whose valid
    slots are kv_mask [B, S] (False for left padding and for slots not yet written)."""
    slots = jnp.arange(kv_mask.shape[1])
    query_slots = cache_index + jnp.arange(length)
    causal = slots[None, :] <= query_slots[:, None]  # [T, S]
    return causal[None] & kv_mask[:, None, :]


def dot_product_attention(q, k, v, mask, config: LlamaConfig) -> jnp.ndarray:
    """q [B, T, N, H], k/v [B, S, K, H], mask [B, T, S] -> [B, T, N, H]; softmax in float32."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, n // kv, h)  # [B, T, K, G, H]
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(h ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache: Optional[KVCache] = None, cache_index=None):
        """x [B, T, D]; cos/sin [B, T, H/2]; mask [B, T, S]. With a cache, the new keys/values are written at
        `cache_index` and attention runs over the whole cache. Returns (y [B, T, D], the new keys/values
        {"k", "v"} [B, T, K, H] to write at cache_index, or None without a cache)."""
        cfg = self.config
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        d, n, kvh, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        init = kernel_init(cfg)
        wq = param_with_axes(self, "q", init, (d, n, h), pdt, ("embed", "heads", "head_dim")).astype(dt)
        wk = param_with_axes(self, "k", init, (d, kvh, h), pdt, ("embed", "kv_heads", "head_dim")).astype(dt)
        wv = param_with_axes(self, "v", init, (d, kvh, h), pdt, ("embed", "kv_heads", "head_dim")).astype(dt)
        wo = param_with_axes(self, "o", init, (n, h, d), pdt, ("heads", "head_dim", "embed")).astype(dt)

        q = apply_rotary(jnp.einsum("BTD,DNH->BTNH", x, wq), cos, sin)
        k = apply_rotary(jnp.einsum("BTD,DKH->BTKH", x, wk), cos, sin)
        v = jnp.einsum("BTD,DKH->BTKH", x, wv)
        q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", "head_dim"))

        new_kv = None
        if cache is not None:
            # Return only the T new keys/values; the caller writes them into the stacked cache once, so
            # the cache is updated in place instead of being rebuilt as a second copy by the layer scan.
            new_kv = {"k": k.astype(cache["k"].dtype), "v": v.astype(cache["v"].dtype)}
            zero = jnp.zeros((), jnp.int32)
            start = (zero, jnp.asarray(cache_index, jnp.int32), zero, zero)
            k = jax.lax.dynamic_update_slice(cache["k"], new_kv["k"], start).astype(dt)  # [B, S, K, H]
            v = jax.lax.dynamic_update_slice(cache["v"], new_kv["v"], start).astype(dt)

        out = dot_product_attention(q, k, v, mask, cfg)  # [B, T, N, H]
        return jnp.einsum("BTNH,NHD->BTD", out, wo), new_kv
