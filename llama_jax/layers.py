"""Building blocks: RMSNorm, the token embedding, the SwiGLU MLP.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`), so sharding is decided by
the rules table in `sharding.py`, never here. Legend: B batch, T length, D model dim, F MLP hidden, V vocab.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.config import LlamaConfig


def dtype_of(name: str):
    return jnp.dtype(name)


def param_with_axes(module: nn.Module, name: str, init, shape, dtype, axes):
    """A parameter whose metadata carries the logical axis names `axes` (one per dimension)."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def kernel_init(config: LlamaConfig):
    return nn.initializers.normal(stddev=config.initializer_range)


class RMSNorm(nn.Module):
    """x / rms(x) * scale, with the statistics in float32 (as transformers does)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:  # [..., D] -> [..., D]
        cfg = self.config
        scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],),
                                dtype_of(cfg.param_dtype), ("norm",))
        xf = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
        normed = (xf * jax.lax.rsqrt(variance + cfg.rms_norm_eps)).astype(dtype_of(cfg.dtype))
        return scale.astype(dtype_of(cfg.dtype)) * normed


class Embedding(nn.Module):
    """Token embedding [V, D]; `attend` reuses it as the output projection when embeddings are tied."""

    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.embedding = param_with_axes(self, "embedding", kernel_init(cfg), (cfg.vocab_size, cfg.hidden_size),
                                         dtype_of(cfg.param_dtype), ("vocab", "embed"))

    def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:  # [B, T] -> [B, T, D]
        # Gather the fsdp-split embed dimension first: a gather from a table split on both axes makes the
        # SPMD partitioner replicate the whole table ("involuntary full rematerialization").
        table = nn.with_logical_constraint(self.embedding, ("vocab", None))
        return jnp.take(table, tokens, axis=0).astype(dtype_of(self.config.dtype))

    def attend(self, x: jnp.ndarray) -> jnp.ndarray:  # [B, T, D] -> [B, T, V] float32
        emb = self.embedding.astype(dtype_of(self.config.dtype))
        return jnp.einsum("BTD,VD->BTV", x, emb, preferred_element_type=jnp.float32)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:  # [B, T, D] -> [B, T, D]
        cfg = self.config
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        d, f = cfg.hidden_size, cfg.intermediate_size
        gate = param_with_axes(self, "gate", kernel_init(cfg), (d, f), pdt, ("embed", "mlp")).astype(dt)
        up = param_with_axes(self, "up", kernel_init(cfg), (d, f), pdt, ("embed", "mlp")).astype(dt)
        down = param_with_axes(self, "down", kernel_init(cfg), (f, d), pdt, ("mlp", "embed")).astype(dt)
        h = nn.silu(jnp.einsum("BTD,DF->BTF", x, gate)) * jnp.einsum("BTD,DF->BTF", x, up)  # [B, T, F]
        h = nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))
        return jnp.einsum("BTF,FD->BTD", h, down)
