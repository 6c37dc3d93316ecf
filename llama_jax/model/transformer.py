"""The Llama decoder: embed -> L pre-norm blocks (stacked with nn.scan) -> RMSNorm -> logits.

Legend: B batch, T query length, S key/cache length, D model dim, V vocab, L layers.

Parameter layout (the one layout the converter, checkpoints and export speak; layer axis first):
    embed/embedding            [V, D]
    layers/attn_norm/scale     [L, D]
    layers/attn/{q}            [L, D, N, H]      layers/attn/{k,v}   [L, D, K, H]
    layers/attn/o              [L, N, H, D]
    layers/mlp_norm/scale      [L, D]
    layers/mlp/{gate,up}       [L, D, F]         layers/mlp/down     [L, F, D]
    final_norm/scale           [D]
    lm_head                    [D, V]            (absent when embeddings are tied)
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.model.attention import Attention, cache_mask, causal_mask, write_slots
from llama_jax.config import LlamaConfig
from llama_jax.model.layers import MLP, Embedding, RMSNorm, dense, dtype_of, kernel_init, param_with_axes
from llama_jax.model.rope import rotary_tables

PARAM_LAYOUT = "llama_jax/stacked-v1"

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("qkv_proj"),
}


class Block(nn.Module):
    """One pre-norm decoder block; written for nn.scan: (carry x, per-layer cache) -> (x, the new k/v), or with
    `return_cache` (x, the updated layer cache)."""

    config: LlamaConfig
    return_cache: bool = False

    @nn.compact
    def __call__(self, x, layer_cache, cos, sin, mask, cache_index):
        cfg = self.config
        h, new_kv = Attention(cfg, return_cache=self.return_cache, name="attn")(
            RMSNorm(cfg, name="attn_norm")(x), cos, sin, mask, layer_cache, cache_index)
        x = x + h
        x = x + MLP(cfg, name="mlp")(RMSNorm(cfg, name="mlp_norm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return x, new_kv


def _block_class(config: LlamaConfig):
    if config.remat == "none":
        return Block
    return nn.remat(Block, policy=_REMAT_POLICIES[config.remat], prevent_cse=False)


class Llama(nn.Module):
    """`Llama(config).apply({"params": params}, tokens)` -> float32 logits [B, T, V].

    Optional inputs: `positions` [B, T] (default 0..T-1, or cache_index.. with a cache) and `segment_ids`
    [B, T] for packed sequences (attention never crosses segments). With `cache` (see `init_cache`), the new
    tokens are written at `cache_index`, `kv_mask` [B, S] marks valid cache slots, and the call returns
    (logits, new_cache). `logits_at` [B] computes logits only at one position per row -> [B, 1, V].
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, cache=None, cache_index=None, kv_mask=None,
                 logits_at=None):
        cfg = self.config
        batch, length = tokens.shape
        if positions is None:
            offset = 0 if cache is None else cache_index
            positions = jnp.broadcast_to(offset + jnp.arange(length, dtype=jnp.int32), (batch, length))
        embed = Embedding(cfg, name="embed")
        x = nn.with_logical_constraint(embed(tokens), ("batch", "length", "act_embed"))  # [B, T, D]
        cos, sin = rotary_tables(cfg, positions)

        if cache is None:
            mask = causal_mask(segment_ids, batch, length)
        else:
            if cache_index is None:
                raise ValueError("Llama: a cache needs cache_index (the slot of the first new token)")
            cache_len = _cache_length(cache)
            if kv_mask is None:
                kv_mask = jnp.broadcast_to(jnp.arange(cache_len) < cache_index + length, (batch, cache_len))
            mask = cache_mask(cache_index, kv_mask, length)

        if self.has_variable("params", "layers_0"):  # per-layer parameters: see `unstack_layers`
            x, new_cache = self._unrolled_layers(x, cache, cos, sin, mask, cache_index)
        else:
            if cache is not None and _is_per_layer(cache):
                raise ValueError("Llama: a per-layer cache (init_cache(..., per_layer=True)) goes with per-layer "
                                 "parameters (unstack_layers(params)); these parameters are stacked")
            stack = nn.scan(
                _block_class(cfg), variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
            x, new_kv = stack(cfg, name="layers")(x, cache, cos, sin, mask, cache_index)  # [L, ...] each
            new_cache = None if cache is None else write_slots(cache, new_kv, cache_index)
        x = RMSNorm(cfg, name="final_norm")(x)

        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at.astype(jnp.int32)[:, None, None], axis=1)  # [B, 1, D]
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            head = param_with_axes(self, "lm_head", kernel_init(cfg), (cfg.hidden_size, cfg.vocab_size),
                                   dtype_of(cfg.param_dtype), ("embed", "vocab"))
            logits = dense(x, head.astype(dtype_of(cfg.dtype)), out_dtype=jnp.float32)  # BTD,DV->BTV
        logits = nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))
        return logits if cache is None else (logits, new_cache)

    def _unrolled_layers(self, x, cache, cos, sin, mask, cache_index):
        """The blocks one after another on per-layer parameters `layers_i` (see `unstack_layers`).
        Returns (x, the updated cache, or None without one)."""
        cfg = self.config
        # A per-layer cache: each block returns its updated buffers (the attention's one in-place update).
        per_layer = cache is not None and _is_per_layer(cache)
        new_kv = []
        for i in range(cfg.num_layers):
            layer_cache = None if cache is None else {"k": cache["k"][i], "v": cache["v"][i]}
            x, kv = _block_class(cfg)(cfg, return_cache=per_layer, name=f"layers_{i}")(
                x, layer_cache, cos, sin, mask, cache_index)
            new_kv.append(kv)
        if cache is None:
            return x, None
        if per_layer:
            return x, {n: tuple(kv[n] for kv in new_kv) for n in ("k", "v")}
        stacked = {n: jnp.stack([kv[n] for kv in new_kv]) for n in ("k", "v")}
        return x, write_slots(cache, stacked, cache_index)


def _is_per_layer(cache: dict) -> bool:
    return isinstance(cache["k"], (list, tuple))


def _cache_length(cache: dict) -> int:
    return (cache["v"][0] if _is_per_layer(cache) else cache["v"]).shape[-2]  # v: [(L,) B, K, S, H]


def unstack_layers(params: dict, fuse: bool = False) -> dict:
    """The parameter tree with the stacked `layers` [L, ...] split into `layers_0` .. `layers_{L-1}`, one
    buffer per layer; `Llama.apply` runs such a tree with a Python loop over the layers (same numbers).

    For decoding: inside a compiled decode loop, the scanned model slices every layer's weights out of the
    stacked arrays at every step, and XLA (on CPU at least) copies each slice before the matmul reads it,
    about tripling the memory traffic of a step that should read each weight once. With one buffer per layer
    the matmuls read the weights in place: `generate_ids(unstack_layers(params), config, ...)`. Training
    keeps the stacked tree (one scanned block: compile time flat in depth).

    `fuse`: also join each layer's q, k and v into one `qkv` weight [D, (N + 2K)·H] and gate and up into one
    `gate_up` [D, 2F] (int8 weights too): at batch 1, fewer and wider matrix-vector products read memory
    faster on a CPU (bench-135m: 7% of a decode step). Such a tree is for `Llama.apply` only."""
    if "layers" not in params:
        raise KeyError(f"unstack_layers: expected a 'layers' entry (the stacked blocks); found {sorted(params)}")
    depth = jax.tree.leaves(params["layers"])[0].shape[0]
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(depth):
        layer = jax.tree.map(lambda a, i=i: a[i], params["layers"])
        if fuse:
            attn, mlp = dict(layer["attn"]), dict(layer["mlp"])
            attn["qkv"] = _join([attn.pop(n) for n in ("q", "k", "v")])
            mlp["gate_up"] = _join([mlp.pop(n) for n in ("gate", "up")])
            layer = {**layer, "attn": attn, "mlp": mlp}
        out[f"layers_{i}"] = layer
    return out


def _join(weights: list):
    """Input-side weights [D, ...] (arrays or int8 QArrays) as one [D, sum of their output sizes]."""
    from llama_jax.model.quantize import QArray

    if isinstance(weights[0], QArray):  # one scale per output channel: the scales join like the values
        return QArray(_join([w.q for w in weights]), _join([w.scale for w in weights]))
    return jnp.concatenate([w.reshape(w.shape[0], -1) for w in weights], axis=1)


# The logical axes of the cache arrays (sharding.DEFAULT_RULES maps them onto a mesh); see attention.KVCache.
CACHE_AXES = {"k": ("layers", "cache_batch", "kv_heads", "head_dim", "cache_length"),
              "v": ("layers", "cache_batch", "kv_heads", "cache_length", "head_dim")}


def cache_axes(batch: int, per_layer: bool = False) -> dict:
    """The logical axes of each array that `init_cache(config, batch, ..., per_layer)` makes."""
    if not per_layer:
        return dict(CACHE_AXES)
    return {n: axes[2:] if batch == 1 else axes[1:] for n, axes in CACHE_AXES.items()}


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=None, per_layer: bool = False) -> dict:
    """An empty KV cache: keys [L, B, K, H, S] and values [L, B, K, S, H] (see `attention.KVCache`), in the
    compute dtype unless `dtype` is given.

    `per_layer`: a tuple of L arrays for each instead, for per-layer parameters (`unstack_layers`). Each layer
    then updates and reads its own buffer in place; slicing layer i out of one stacked array copies it, and at
    batch 8 such copies cost a CPU decode step about 10%. At batch 1 these buffers drop the batch axis: XLA:CPU
    otherwise fuses the in-place update once more into the product that reads it without that unit axis, which
    costs a copy of every layer's cache at every step (13% of a batch-1 step)."""
    kv, h = config.num_kv_heads, config.head_dim
    shapes = {"k": (batch, kv, h, max_len), "v": (batch, kv, max_len, h)}
    dt = jnp.dtype(dtype) if dtype is not None else dtype_of(config.dtype)
    if per_layer:
        shapes = {n: shape[1:] if batch == 1 else shape for n, shape in shapes.items()}
        return {n: tuple(jnp.zeros(shape, dt) for _ in range(config.num_layers)) for n, shape in shapes.items()}
    return {n: jnp.zeros((config.num_layers,) + shape, dt) for n, shape in shapes.items()}


def init_params(config: LlamaConfig, rng: jax.Array, seq_len: int = 8) -> dict:
    """Random parameters (unsharded; see `sharding.init_sharded_params` for a mesh), plain arrays."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    variables = jax.jit(Llama(config).init)(rng, tokens)
    return nn.meta.unbox(variables["params"])


def param_shapes(config: LlamaConfig) -> dict:
    """The parameter tree as jax.ShapeDtypeStruct leaves (nothing is allocated)."""
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    variables = jax.eval_shape(Llama(config).init, jax.random.PRNGKey(0), tokens)
    return nn.meta.unbox(variables["params"])


def logical_axes(config: LlamaConfig) -> dict:
    """The parameter tree with a tuple of logical axis names at each leaf."""
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    variables = jax.eval_shape(Llama(config).init, jax.random.PRNGKey(0), tokens)
    return nn.get_partition_spec(variables)["params"]
