"""Llama 3.2 Vision's gated cross-attention decoder layer: text queries attend to the image tokens.

Legend: B batch, T query length, S image tokens (I images x X tiles x P tokens per tile), D model dim, N query
heads, K kv heads, H head dim, F MLP hidden, Lc cross layers.

One layer (transformers' MllamaCrossAttentionDecoderLayer, Meta's CrossAttentionTransformerBlock):

    x = x + tanh(attn_gate) * o(attend(q_norm(q(norm(x))), k_norm(k(images)), v(images), mask))
    x = x + tanh(mlp_gate) * row * mlp(norm(x))

No RoPE (the image tokens have no position in the text). The keys/values depend on the images only, so they
are computed once per prompt (`keys_values`, for every layer of the stack at once: `stack_keys_values`) and
cached; a decode step reads them. `row` [B, T] is transformers' `full_text_row_masked_out_mask`: 0 for a token
that sees no image tile. Such a row's attention mask is opened to every image token (it would otherwise be all
masked), as transformers does; its attention output is NOT zeroed (transformers adds it, gated; Meta's reference
zeroes it too): we follow transformers, the numerics oracle. Its MLP output is zeroed in both.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.config import LlamaConfig
from llama_jax.model.attention import attend_and_project
from llama_jax.model.layers import RMSNorm, dense, dtype_of, gated_down, spec_param

PREFIX = "cross_layers"  # the spec's stack of cross layers ([Lc, ...])


def image_token_mask(cross_attention_mask, tokens_per_tile: int):
    """The processor's cross_attention_mask [B, T, I, X] (1: the token sees that image tile) -> [B, T, S] bool
    (the token sees that image token); S = I * X * tokens_per_tile, ordered (image, tile, token) as the states."""
    b, t = cross_attention_mask.shape[:2]
    seen = jnp.asarray(cross_attention_mask) != 0  # [B, T, I, X]
    return jnp.broadcast_to(seen[..., None], seen.shape + (tokens_per_tile,)).reshape(b, t, -1)


def row_masks(seen):
    """What tokens see, [B, T, S] bool -> (attention mask [B, T, S], row [B, T]: the token sees some image
    token). A row that sees nothing attends to all S instead (see the module docstring)."""
    row = jnp.any(seen, axis=-1)
    return seen | ~row[..., None], row


class CrossAttention(nn.Module):
    """Attention from text to image tokens with per-head q/k RMS norms; params cross_layers/attn/..."""

    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.q = spec_param(self, f"{PREFIX}/attn/q")  # [D, N, H]
        self.k = spec_param(self, f"{PREFIX}/attn/k")  # [D, K, H]
        self.v = spec_param(self, f"{PREFIX}/attn/v")
        self.o = spec_param(self, f"{PREFIX}/attn/o")  # [N, H, D]
        self.q_norm = RMSNorm(cfg, f"{PREFIX}/attn/q_norm/scale")  # over H
        self.k_norm = RMSNorm(cfg, f"{PREFIX}/attn/k_norm/scale")

    def keys_values(self, states):
        """Image states [B, S, D] -> {"k": [B, K, H, S], "v": [B, K, S, H]} (the KV cache's layouts)."""
        dt = dtype_of(self.config.dtype)
        states = states.astype(dt)
        k = self.k_norm(dense(states, self.k.astype(dt)))  # BSD,DKH->BSKH
        v = dense(states, self.v.astype(dt))
        return {"k": k.transpose(0, 2, 3, 1), "v": v.transpose(0, 2, 1, 3)}

    def __call__(self, x, kv, mask):
        """x [B, T, D] (normed), kv from `keys_values`, mask [B, T, S] -> [B, T, D]."""
        dt = dtype_of(self.config.dtype)
        q = self.q_norm(dense(x, self.q.astype(dt)))  # BTD,DNH->BTNH
        return attend_and_project(q, kv["k"].astype(dt), kv["v"].astype(dt), mask, self.o.astype(dt), False)


class CrossMLP(nn.Module):
    """SwiGLU with the cross layer's weights (cross_layers/mlp/...)."""

    config: LlamaConfig

    def setup(self):
        self.gate = spec_param(self, f"{PREFIX}/mlp/gate")
        self.up = spec_param(self, f"{PREFIX}/mlp/up")
        self.down = spec_param(self, f"{PREFIX}/mlp/down")

    def __call__(self, x):  # [B, T, D] -> [B, T, D]
        dt = dtype_of(self.config.dtype)
        return gated_down(dense(x, self.gate.astype(dt)), dense(x, self.up.astype(dt)), self.down.astype(dt))


class CrossBlock(nn.Module):
    """One gated cross-attention decoder layer (its params are one slice of the cross_layers stack)."""

    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.attn = CrossAttention(cfg)
        self.attn_norm = RMSNorm(cfg, f"{PREFIX}/attn_norm/scale")
        self.attn_gate = spec_param(self, f"{PREFIX}/attn_gate")  # [1]
        self.mlp = CrossMLP(cfg)
        self.mlp_norm = RMSNorm(cfg, f"{PREFIX}/mlp_norm/scale")
        self.mlp_gate = spec_param(self, f"{PREFIX}/mlp_gate")

    def keys_values(self, states):
        return self.attn.keys_values(states)

    def __call__(self, x, kv, mask, row):
        """x [B, T, D], kv (`keys_values`), mask [B, T, S] bool, row [B, T] bool -> x [B, T, D]."""
        dt = x.dtype
        h = self.attn(self.attn_norm(x), kv, mask)
        x = x + jnp.tanh(self.attn_gate.astype(jnp.float32)).astype(dt) * h
        h = self.mlp(self.mlp_norm(x)) * row[..., None].astype(dt)
        x = x + jnp.tanh(self.mlp_gate.astype(jnp.float32)).astype(dt) * h
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))


def stack_keys_values(config: LlamaConfig, cross_params: dict, states) -> dict:
    """Every cross layer's keys/values: the stacked cross_layers params [Lc, ...] and image states [B, S, D] ->
    {"k": [Lc, B, K, H, S], "v": [Lc, B, K, S, H]}."""
    one = lambda p: CrossBlock(config).apply({"params": p}, states, method=CrossBlock.keys_values)  # noqa: E731
    return jax.vmap(one)(cross_params)


def apply_layer(config: LlamaConfig, layer_params: dict, x, kv, mask, row):
    """One cross layer (params: one slice of the stack) on x [B, T, D], under the config's remat policy as the
    self layers are (its attention scores over every image token are a training step's largest temporaries)."""
    def run(p, x, kv):
        return CrossBlock(config).apply({"params": p}, x, kv, mask, row)

    if config.remat != "none":
        from llama_jax.model.transformer import REMAT_POLICY_FUNCTIONS

        run = jax.checkpoint(run, policy=REMAT_POLICY_FUNCTIONS[config.remat], prevent_cse=False)
    return run(layer_params, x, kv)


def create_stack(config: LlamaConfig, x, states):
    """Create the cross_layers params [Lc, ...] under the calling module (at init): nn.scan over the layers, as
    the self layers are, so the spec's shapes, initializers and logical axes (with "layers" first) hold."""
    def init_layer(block, x, states):
        kv = block.keys_values(states)
        mask = jnp.ones(x.shape[:2] + (states.shape[1],), bool)
        return block(x, kv, mask, mask[..., 0]), None

    stack = nn.scan(init_layer, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=nn.broadcast, length=len(config.cross_attention_layers),
                    metadata_params={nn.PARTITION_NAME: "layers"})
    return stack(CrossBlock(config, name=PREFIX), x, states)
