"""Llama 3.2 Vision (Mllama): the Llama text model with gated cross-attention layers over image tokens.

Legend: B batch, T query length, S key/cache length, I images per row, X tiles per image (vision.max_num_tiles),
P tokens per tile (vision.num_patches), S_img = I * X * P image tokens, D model dim, K kv heads, H head dim,
L self layers, Lc cross layers, V vocab.

    logits = VisionLlama(config).apply({"params": params}, tokens, pixel_values=..., aspect_ratio_ids=...,
                                       aspect_ratio_mask=..., cross_attention_mask=...)   # [B, T, V] float32

The image arrays are what transformers' MllamaProcessor returns (pixel_values [B, I, X, C, H, W],
aspect_ratio_ids [B, I], aspect_ratio_mask [B, I, X], cross_attention_mask [B, T, I, X]). Without images the
cross layers are skipped (transformers does the same): the text model's logits. `cross_attention_states`
[B, S_img, D] may be given instead of pixel_values (the encoder's output, e.g. computed once elsewhere).

The layers: the self layers are `Llama`'s (Block, the stacked "layers" [L, ...]); the cross layers
(model/cross_attention.py) sit among them at config.cross_attention_layers (HF numbering, self and cross
counted together). Each run of self layers between two cross layers is one lax.scan over its slice of the
stack, and each cross layer is applied in between (one slice of "cross_layers" [Lc, ...]). Why runs and not
one scan with a per-step cond: the self layers keep Llama's scan (params as scanned inputs: their gradients are
per-layer outputs, remat policies apply unchanged), and a cond inside the scan would keep both branches'
residuals for the backward pass at every step; the cost is one compiled loop body per run (9 for 11B's 8 cross
layers), small next to unrolling 40 layers. Without a cache the runs scan over slices of the stack; with a
cache (sampling, no gradient) they scan over layer indices into the whole stack and the whole KV cache, so a
decode step never copies weights or the cache.

The cache (`init_cache(config, batch, max_len, num_images=I)`; for V3's Sampler):
    "k" [L, B, K, H, S], "v" [L, B, K, S, H]   the self layers' KV cache, as Llama's
    "cross_k" [Lc, B, K, H, S_img], "cross_v" [Lc, B, K, S_img, H]
                                              every cross layer's image keys/values, written by the call that
                                              passes the images (the prefill) and read by every later call
    "cross_mask" [B, S_img] bool              the image tokens the prompt's last token sees (the row at
                                              `logits_at`, else at T-1): decode steps use it for their tokens, as
                                              transformers' generate repeats the last row of the mask
A cache without the cross fields (num_images=0) is a text-only prompt's: the cross layers are skipped.
A decode step passes no pixel_values and no cross_attention_mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.config import LlamaConfig
from llama_jax.errors import ImageError
from llama_jax.model import cross_attention as xattn
from llama_jax.model.attention import causal_mask, write_slots
from llama_jax.model.transformer import Block, Llama, remat_block

CROSS_CACHE = ("cross_k", "cross_v", "cross_mask")


@dataclasses.dataclass
class _ImageInputs:
    pixel_values: Any = None
    aspect_ratio_ids: Any = None
    aspect_ratio_mask: Any = None
    cross_attention_mask: Any = None
    states: Any = None
    logits_at: Any = None


class VisionLlama(Llama):
    """`VisionLlama(config).apply({"params": params}, tokens, pixel_values=..., ...)` -> float32 logits [B, T, V]
    (and the new cache when `cache` is given). The text side is `Llama.__call__` itself (embedding, rotary
    tables, masks, final norm, head); this class adds the image inputs and overrides `blocks`."""

    @nn.compact
    def __call__(self, tokens, pixel_values=None, aspect_ratio_ids=None, aspect_ratio_mask=None,
                 cross_attention_mask=None, positions=None, cache=None, cache_index=None, kv_mask=None,
                 logits_at=None, segment_ids=None, cross_attention_states=None):
        if self.config.vision is None:
            raise ImageError("VisionLlama needs a vision config (Llama 3.2 Vision); use Llama for text models")
        if pixel_values is not None and aspect_ratio_ids is None:
            raise ImageError("VisionLlama: pixel_values were given without aspect_ratio_ids [batch, images]")
        if pixel_values is not None and aspect_ratio_mask is None:  # every tile real, as transformers assumes
            aspect_ratio_mask = jnp.ones(jnp.shape(pixel_values)[:3], jnp.int32)
        # Flax modules are frozen dataclasses: the per-call image inputs reach `blocks` (called from inside
        # Llama.__call__, which this class shares rather than copies) on the bound instance of this call.
        object.__setattr__(self, "_images", _ImageInputs(pixel_values, aspect_ratio_ids, aspect_ratio_mask,
                                                         cross_attention_mask, cross_attention_states, logits_at))
        return super().__call__(tokens, positions=positions, segment_ids=segment_ids, cache=cache,
                                cache_index=cache_index, kv_mask=kv_mask, logits_at=logits_at)

    def blocks(self, x, cache, cos, sin, mask, cache_index):
        """The self and cross layers in config order. Returns (x, the new cache or None)."""
        cfg = self.config
        if self.is_initializing():  # create "layers" exactly as Llama does
            Llama.blocks(self, x, None, cos, sin, causal_mask(None, *x.shape[:2]), None)
        states = self.image_states()
        if self.is_initializing():
            dummy = jnp.zeros((x.shape[0], 1, cfg.hidden_size), x.dtype)
            xattn.create_stack(cfg, x, dummy if states is None else states)
        cross = self.cross_inputs(states, cache, x.shape[1])
        if cross is None:  # text only: Llama's own scan over the whole stack (made above at init)
            if self.is_initializing():
                return x, None
            return Llama.blocks(self, x, cache, cos, sin, mask, cache_index)
        params = nn.meta.unbox(self.variables["params"])
        kv, image_mask, row = cross["kv"], cross["mask"], cross["row"]
        new_kv = []
        for kind, a, b in layer_runs(cfg):
            if kind == "cross":
                layer = jax.tree.map(lambda w: w[a], params[xattn.PREFIX])
                x = xattn.apply_layer(cfg, layer, x, jax.tree.map(lambda c: c[a], kv), image_mask, row)
            elif cache is None:
                x = self_run(cfg, params["layers"], x, cos, sin, mask, a, b)
            else:
                x, run_kv = self_run_cached(cfg, params["layers"], cache, x, cos, sin, mask, cache_index, a, b)
                new_kv.append(run_kv)
        if cache is None:
            return x, None
        stacked = {n: jnp.concatenate([r[n] for r in new_kv], axis=0) for n in ("k", "v")}
        new_cache = write_slots({n: cache[n] for n in ("k", "v")}, stacked, cache_index)
        new_cache.update(cross["cache"])
        return x, new_cache

    def image_states(self):
        """[B, S_img, D] from the images of this call (the encoder and projector), or None."""
        img = self._images
        if img.pixel_values is not None:
            from llama_jax.model.vision import Projector, VisionEncoder

            features = VisionEncoder(self.config, name="vision")(
                jnp.asarray(img.pixel_values), jnp.asarray(img.aspect_ratio_ids), jnp.asarray(img.aspect_ratio_mask))
            return Projector(self.config, name="projector")(features)
        return None if img.states is None else jnp.asarray(img.states)

    def cross_inputs(self, states, cache, length: int) -> Optional[dict]:
        """What the cross layers read: {"kv": per-layer keys/values [Lc, ...], "mask" [B, T, S_img], "row" [B, T],
        "cache": the cross fields of the new cache}; None when there are no images (the layers are skipped)."""
        cfg, img = self.config, self._images
        tokens = cfg.vision.num_patches
        has_cached = cache is not None and "cross_k" in cache
        if states is None and not has_cached:
            return None
        if states is not None:
            params = nn.meta.unbox(self.variables["params"])
            kv = xattn.stack_keys_values(cfg, params[xattn.PREFIX], states)
            seen = _seen(img.cross_attention_mask, states.shape[:2], length, tokens)
        else:
            kv = {"k": cache["cross_k"], "v": cache["cross_v"]}
            if img.cross_attention_mask is not None:
                seen = _seen(img.cross_attention_mask, (cache["cross_mask"].shape[0], kv["k"].shape[-1]), length,
                             tokens)
            else:
                seen = jnp.broadcast_to(cache["cross_mask"][:, None, :], (cache["cross_mask"].shape[0], length,
                                                                           cache["cross_mask"].shape[1]))
        mask, row = xattn.row_masks(seen)
        new = {}
        if cache is not None:
            new = {n: cache[n] for n in CROSS_CACHE if n in cache}
            if states is not None:
                if not has_cached or cache["cross_k"].shape[-1] != states.shape[1]:
                    found = cache["cross_k"].shape[-1] if has_cached else 0
                    raise ImageError(f"VisionLlama: the cache holds {found} image tokens, the images give "
                                     f"{states.shape[1]}: make it with init_cache(config, batch, max_len, "
                                     f"num_images={states.shape[1] // (cfg.vision.max_num_tiles * tokens)})")
                last = (jnp.full((seen.shape[0],), length - 1, jnp.int32) if img.logits_at is None
                        else jnp.asarray(img.logits_at, jnp.int32))
                new = {"cross_k": kv["k"].astype(cache["cross_k"].dtype),
                       "cross_v": kv["v"].astype(cache["cross_v"].dtype),
                       "cross_mask": jnp.take_along_axis(seen, last[:, None, None], axis=1)[:, 0]}
        return {"kv": kv, "mask": mask, "row": row, "cache": new}


def _seen(cross_attention_mask, batch_and_tokens, length: int, tokens_per_tile: int):
    """The tokens' view of the images [B, T, S_img] bool from the processor's mask [B, T, I, X] (None: every
    token sees every image token, as transformers without a mask)."""
    batch, image_tokens = batch_and_tokens
    if cross_attention_mask is None:
        return jnp.ones((batch, length, image_tokens), bool)
    m = jnp.asarray(cross_attention_mask)
    expected_tokens = m.shape[2] * m.shape[3] * tokens_per_tile if m.ndim == 4 else None
    if m.ndim != 4 or m.shape[0] != batch or m.shape[1] != length or expected_tokens != image_tokens:
        raise ImageError(f"cross_attention_mask has shape {list(m.shape)}, expected [{batch}, {length}, images, "
                         f"tiles] (batch, tokens of this call, images x tiles = {image_tokens // tokens_per_tile} "
                         "as the images)")
    return xattn.image_token_mask(m, tokens_per_tile)


def layer_runs(config: LlamaConfig):
    """The layers in order as ("self", start, stop) runs of the self stack and ("cross", k, None) layers."""
    runs, start = [], 0
    for k, hf_index in enumerate(config.cross_attention_layers):
        stop = hf_index - k  # self layers before cross layer k
        if stop > start:
            runs.append(("self", start, stop))
        runs.append(("cross", k, None))
        start = stop
    if config.num_layers > start:
        runs.append(("self", start, config.num_layers))
    return runs


def self_run(config: LlamaConfig, layers: dict, x, cos, sin, mask, start: int, stop: int):
    """Self layers start..stop-1 without a cache: a scan over that slice of the stacked params."""
    block = remat_block(Block, config)(config)

    def body(x, p):
        return block.apply({"params": p}, x, None, cos, sin, mask, None)[0], None

    x, _ = jax.lax.scan(body, x, jax.tree.map(lambda w: w[start:stop], layers))
    return x


def self_run_cached(config: LlamaConfig, layers: dict, cache: dict, x, cos, sin, mask, cache_index, start: int,
                    stop: int):
    """Self layers start..stop-1 with the KV cache: a scan over layer indices into the whole stack and cache
    (nothing sliced out and copied). Returns (x, their new keys/values {"k": [n, B, K, H, T], "v": ...})."""
    block = Block(config)

    def body(x, i):
        p = jax.tree.map(lambda w: w[i], layers)
        layer_cache = {n: cache[n][i] for n in ("k", "v")}
        return block.apply({"params": p}, x, layer_cache, cos, sin, mask, cache_index)

    return jax.lax.scan(body, x, jnp.arange(start, stop))


# ------------------------------------------------------------------------------------------ cache and init
def image_cache_shapes(config: LlamaConfig, batch: int, num_images: int) -> dict:
    """The cross fields of the cache (see the module docstring): {name: shape}."""
    lc, kv, h = len(config.cross_attention_layers), config.num_kv_heads, config.head_dim
    s = num_images * config.vision.max_num_tiles * config.vision.num_patches
    return {"cross_k": (lc, batch, kv, h, s), "cross_v": (lc, batch, kv, s, h), "cross_mask": (batch, s)}


def init_image_cache(config: LlamaConfig, batch: int, num_images: int, dtype) -> dict:
    """Zeroed cross fields for `num_images` images per row (keys/values in `dtype`, the mask bool)."""
    shapes = image_cache_shapes(config, batch, num_images)
    return {n: jnp.zeros(s, bool if n == "cross_mask" else dtype) for n, s in shapes.items()}


def init_inputs(config: LlamaConfig, seq_len: int = 8) -> tuple:
    """(tokens, image kwargs) for `init`: one one-tile image, so the encoder and projector params are created."""
    v = config.vision
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    images = dict(pixel_values=jnp.zeros((1, 1, v.max_num_tiles, v.num_channels, v.image_size, v.image_size),
                                         jnp.float32),
                  aspect_ratio_ids=jnp.ones((1, 1), jnp.int32),
                  aspect_ratio_mask=jnp.zeros((1, 1, v.max_num_tiles), jnp.int32).at[:, :, 0].set(1))
    return tokens, images


def init_params(config: LlamaConfig, rng: jax.Array, seq_len: int = 8) -> dict:
    """Random parameters of a vision config: the text model, the cross layers, the encoder, the projector."""
    tokens, images = init_inputs(config, seq_len)
    variables = jax.jit(lambda r: VisionLlama(config).init(r, tokens, **images))(rng)
    return nn.meta.unbox(variables["params"])


def traced_param_tree(config: LlamaConfig) -> tuple:
    """(shapes, logical axes) as Flax's init builds them for a vision config (tests compare the spec's)."""
    tokens, images = init_inputs(config)
    variables = jax.eval_shape(lambda r: VisionLlama(config).init(r, tokens, **images), jax.random.PRNGKey(0))
    return nn.meta.unbox(variables["params"]), nn.get_partition_spec(variables)["params"]


