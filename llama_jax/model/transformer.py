"""The Llama decoder: embed -> L pre-norm blocks (stacked with nn.scan) -> RMSNorm -> logits.

Legend: B batch, T query length, S key/cache length, D model dim, V vocab, L layers.

The parameters (paths, shapes, logical axes, checkpoint names) are stated once, in `model/spec.py`; the modules
create each one with `spec_param(self, "layers/attn/q")`. `python -m llama_jax.model` prints the table.
"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.model.attention import Attention, cache_mask, causal_mask, starts_at_zero, write_slots
from llama_jax.config import LlamaConfig
from llama_jax.model import spec
from llama_jax.model.layers import MLP, Embedding, RMSNorm, dense, dtype_of, spec_param
from llama_jax.model.rope import rotary_tables
from llama_jax.model.splash import runs_splash

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("qkv_proj"),
}
REMAT_POLICY_FUNCTIONS = _REMAT_POLICIES  # for layers outside the scanned blocks (Mllama's cross layers)


class Block(nn.Module):
    """One pre-norm decoder block; written for nn.scan: (carry x, per-layer cache) -> (x, the new k/v)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, layer_cache, cos, sin, mask, cache_index):
        cfg = self.config
        h, new_kv = Attention(cfg, name="attn")(
            RMSNorm(cfg, "layers/attn_norm/scale", name="attn_norm")(x), cos, sin, mask, layer_cache, cache_index)
        x = x + h
        x = x + MLP(cfg, name="mlp")(RMSNorm(cfg, "layers/mlp_norm/scale", name="mlp_norm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return x, new_kv


def remat_block(block_class, config: LlamaConfig):
    """`block_class` under the config's rematerialisation policy (itself when remat is "none")."""
    if config.remat == "none":
        return block_class
    return nn.remat(block_class, policy=_REMAT_POLICIES[config.remat], prevent_cse=False)


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

        if runs_splash(cfg, length, starts_at_zero(cache, cache_index)):
            # The kernel takes segment ids [B, T] in place of a mask: packed documents, or (prefill) the prompt
            # as segment 1 apart from its left padding, segment 0.
            ids = segment_ids if cache is None else kv_mask[:, :length] if kv_mask is not None else None
            mask = jnp.zeros((batch, length), jnp.int32) if ids is None else ids.astype(jnp.int32)
        elif cache is None:
            mask = causal_mask(segment_ids, batch, length)
        else:
            if cache_index is None:
                raise ValueError("Llama: a cache needs cache_index (the slot of the first new token)")
            cache_len = self.cache_length(cache)
            if kv_mask is None:
                last = jnp.reshape(cache_index, (-1, 1)) + length  # [1 or B, 1]: a slot per row (paged cache)
                kv_mask = jnp.broadcast_to(jnp.arange(cache_len) < last, (batch, cache_len))
            mask = cache_mask(cache_index, kv_mask, length)

        x, new_cache = self.blocks(x, cache, cos, sin, mask, cache_index)
        x = RMSNorm(cfg, "final_norm/scale", name="final_norm")(x)

        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at.astype(jnp.int32)[:, None, None], axis=1)  # [B, 1, D]
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            head = spec_param(self, "lm_head")  # [D, V]
            logits = dense(x, head.astype(dtype_of(cfg.dtype)), out_dtype=jnp.float32)  # BTD,DV->BTV
        logits = nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))
        return logits if cache is None else (logits, new_cache)

    def blocks(self, x, cache, cos, sin, mask, cache_index):
        """The L blocks, scanned over the stacked parameters `layers` [L, ...]. Returns (x, the updated cache,
        or None without one). The CPU decoding layout (`llama_jax.cpu.decode_layout.PerLayerLlama`) overrides
        this for per-layer parameters."""
        cfg = self.config
        if not self.is_initializing() and not self.has_variable("params", "layers"):
            raise ValueError(f"Llama: the parameters have no stacked 'layers' (found {sorted(self.variables['params'])}); "
                             "per-layer parameters (unstack_layers) run with llama_jax.cpu.decode_layout.PerLayerLlama")
        stack = nn.scan(
            remat_block(Block, cfg), variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: spec.LAYERS})
        x, new_kv = stack(cfg, name=spec.LAYERS)(x, cache, cos, sin, mask, cache_index)  # [L, ...] each
        return x, (None if cache is None else write_slots(cache, new_kv, cache_index))

    @staticmethod
    def cache_length(cache: dict) -> int:
        if isinstance(cache["v"], (list, tuple)):
            raise ValueError("Llama: a per-layer cache (llama_jax.cpu.decode_layout.init_per_layer_cache) goes with "
                             "per-layer parameters and PerLayerLlama; these parameters are stacked")
        return cache["v"].shape[-2]  # v: [L, B, K, S, H]


# The logical axes of the cache arrays (sharding.DEFAULT_RULES maps them onto a mesh); see attention.KVCache.
CACHE_AXES = {"k": ("layers", "cache_batch", "kv_heads", "head_dim", "cache_length"),
              "v": ("layers", "cache_batch", "kv_heads", "cache_length", "head_dim"),
              # Llama 3.2 Vision's image keys/values and mask (init_cache's num_images; see model/mllama.py)
              "cross_k": ("layers", "cache_batch", "kv_heads", "head_dim", "cache_length"),
              "cross_v": ("layers", "cache_batch", "kv_heads", "cache_length", "head_dim"),
              "cross_mask": ("cache_batch", "cache_length")}


def cache_shapes(config: LlamaConfig, batch: int, max_len: int) -> dict:
    """One layer's cache arrays: keys [B, K, H, S], values [B, K, S, H] (see `attention.KVCache`)."""
    kv, h = config.num_kv_heads, config.head_dim
    return {"k": (batch, kv, h, max_len), "v": (batch, kv, max_len, h)}


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=None, num_images: int = 0) -> dict:
    """An empty KV cache: keys [L, B, K, H, S] and values [L, B, K, S, H] (their logical axes: CACHE_AXES), in
    the compute dtype unless `dtype` is given. `num_images` (a vision config's images per row) adds the
    cross-attention fields of `model/mllama.py` (cross_k, cross_v, cross_mask)."""
    dt = jnp.dtype(dtype) if dtype is not None else dtype_of(config.dtype)
    cache = {n: jnp.zeros((config.num_layers,) + shape, dt) for n, shape in cache_shapes(config, batch, max_len).items()}
    if num_images:
        from llama_jax.model.mllama import init_image_cache  # mllama builds on this module

        cache.update(init_image_cache(config, batch, num_images, dt))
    return cache


def init_params(config: LlamaConfig, rng: jax.Array, seq_len: int = 8) -> dict:
    """Random parameters (unsharded; see `sharding.init_sharded_params` for a mesh), plain arrays; a vision
    config's through `VisionLlama` (model/mllama.py)."""
    if config.vision is not None:
        from llama_jax.model import mllama

        return mllama.init_params(config, rng, seq_len)
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    variables = jax.jit(Llama(config).init)(rng, tokens)
    return nn.meta.unbox(variables["params"])


def param_shapes(config: LlamaConfig) -> dict:
    """The parameter tree as jax.ShapeDtypeStruct leaves (from the spec: nothing is traced or allocated)."""
    return spec.param_shapes(config)


def logical_axes(config: LlamaConfig) -> dict:
    """The parameter tree with a PartitionSpec of logical axis names at each leaf (from the spec)."""
    return spec.logical_axes(config)


def traced_param_tree(config: LlamaConfig) -> tuple:
    """(shapes, logical axes) as Flax's own init builds them: what the spec-derived trees must equal (tests)."""
    if config.vision is not None:
        from llama_jax.model import mllama

        return mllama.traced_param_tree(config)
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    variables = jax.eval_shape(Llama(config).init, jax.random.PRNGKey(0), tokens)
    return nn.meta.unbox(variables["params"]), nn.get_partition_spec(variables)["params"]
