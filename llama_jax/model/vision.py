"""Llama 3.2 Vision's image encoder (a ViT over tiles) and the projector into the text model's width.

Legend: B batch, I images per row, T tiles (config.vision.max_num_tiles), C channels, p patch side, P tokens per
tile (patches + the class token, vision.num_patches), P8 that padded to a multiple of 8, N = B*I images,
S = T*P8 encoder sequence, Dv vision width, Nv heads, Hv head dim, Fv MLP hidden, O vision output dim
(Dv x (1 + intermediate layers)), D text width, L layers.

How the text model (`VisionLlama`, model/mllama.py) gets its cross-attention states:

    # inside a Flax module whose tree holds "vision" and "projector" at its top:
    features = VisionEncoder(cfg, name="vision")(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
    states = Projector(cfg, name="projector")(features)                       # [B, I*T*P, D]
    # or, outside Flax, from the full parameter tree (what a sampler computes once at prefill):
    states = cross_attention_states(params, cfg, pixel_values, aspect_ratio_ids, aspect_ratio_mask)

Inputs are what transformers' MllamaProcessor returns: pixel_values [B, I, T, C, H, W] float32 (H = W =
vision.image_size), aspect_ratio_ids [B, I] int (0 pads a missing image), aspect_ratio_mask [B, I, T] int (1 for
a tile the image has). The states are transformers' `cross_attention_states` (MllamaModel: vision model ->
multi_modal_projector), rows ordered (image, tile, token).

The numerics follow transformers' MllamaVisionModel (and Meta's VisionEncoder in llama_models): every tile's
tokens attend to every tile's in the local and the global transformer alike; the attention mask removes only
pairs whose query AND key are both padding (a missing tile, or one of the tokens padding a tile to P8), as both
references do. The intermediate layers' outputs are interleaved per feature (torch.stack(..., dim=-1) then a
reshape): output feature Dv + d*n + j is feature d of intermediate layer j.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.errors import ImageError
from llama_jax.model import spec
from llama_jax.model.attention import dot_product_attention
from llama_jax.model.layers import dense, dtype_of, spec_param

# transformers builds layernorm_pre / layernorm_post without an eps (torch's default); only the encoder layers'
# norms take vision.norm_eps. (Meta's reference uses torch's default everywhere: norm_eps's released value.)
_TORCH_LAYERNORM_EPS = 1e-5


def _pad_to_8(n: int) -> int:
    return -(-n // 8) * 8


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * scale + bias, statistics in float32. `spec_name`: "<path>" of the pair."""

    config: LlamaConfig
    spec_name: str
    eps: float

    @nn.compact
    def __call__(self, x):  # [..., Dv] -> [..., Dv]
        dt = dtype_of(self.config.dtype)
        scale = spec_param(self, f"{self.spec_name}/scale")
        bias = spec_param(self, f"{self.spec_name}/bias")
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        normed = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dt)


class VisionAttention(nn.Module):
    """Full (bidirectional) multi-head attention without biases; `prefix` is the stack ("vision/layers")."""

    config: LlamaConfig
    prefix: str

    @nn.compact
    def __call__(self, x, mask):  # x [N, S, Dv], mask [N, S, S] bool (True: may attend) -> [N, S, Dv]
        dt = dtype_of(self.config.dtype)
        w = {k: spec_param(self, f"{self.prefix}/attn/{k}").astype(dt) for k in ("q", "k", "v", "o")}
        q, k, v = (dense(x, w[n]) for n in ("q", "k", "v"))  # NSD,DHh->NSHh
        k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # the layouts dot_product_attention reads
        # One tile's queries at a time: the float32 scores are [N, Nv, P8, S], not [N, Nv, S, S] (2.6 GB per
        # image at 11B's S = 4 x 1608). Masked scores are set to finfo.min where transformers adds it: the
        # same softmax.
        block = _pad_to_8(self.config.vision.num_patches)
        out = jnp.concatenate([dot_product_attention(q[:, s:s + block], k, v, mask[:, s:s + block])
                               for s in range(0, q.shape[1], block)], axis=1)  # [N, S, Nv, Hv]
        return dense(out, w["o"], contract=2)  # NSHh,HhD->NSD


class VisionMLP(nn.Module):
    """fc2(gelu(fc1(x) + b1)) + b2 with the exact (erf) GELU, torch's default."""

    config: LlamaConfig
    prefix: str

    @nn.compact
    def __call__(self, x):  # [N, S, Dv] -> [N, S, Dv]
        dt = dtype_of(self.config.dtype)
        p = lambda k: spec_param(self, f"{self.prefix}/mlp/{k}").astype(dt)  # noqa: E731
        h = jax.nn.gelu(dense(x, p("fc1")) + p("fc1_bias"), approximate=False)
        return dense(h, p("fc2")) + p("fc2_bias")


class VisionLayer(nn.Module):
    """One pre-LayerNorm encoder layer, written for nn.scan: ((x, kept), slot, mask) -> ((x, kept), None).
    `kept` [n + 1, N, S, Dv] collects the intermediate layers' outputs: this layer writes x at `slot` (its index
    in intermediate_layers_indices, or n, a scratch slot) - a few [N, S, Dv] arrays where scan's stacked outputs
    would keep all L. `gated` (the global layers, kept None): tanh gates scale both residual branches."""

    config: LlamaConfig
    prefix: str
    gated: bool

    @nn.compact
    def __call__(self, carry, slot, mask):  # x [N, S, Dv], slot [] int32, mask [N, S, S]
        cfg, pre = self.config, self.prefix
        x, kept = carry
        eps = cfg.vision.norm_eps
        h = VisionAttention(cfg, pre, name="attn")(LayerNorm(cfg, f"{pre}/attn_norm", eps, name="attn_norm")(x), mask)
        if self.gated:
            h = jnp.tanh(spec_param(self, f"{pre}/gate_attn")).astype(h.dtype) * h
        x = x + h
        h = VisionMLP(cfg, pre, name="mlp")(LayerNorm(cfg, f"{pre}/mlp_norm", eps, name="mlp_norm")(x))
        if self.gated:
            h = jnp.tanh(spec_param(self, f"{pre}/gate_ffn")).astype(h.dtype) * h
        x = x + h
        if kept is not None:
            kept = jax.lax.dynamic_update_index_in_dim(kept, x, slot, 0)
        return (x, kept), None


def _run_layers(config: LlamaConfig, key: str, gated: bool, x, mask, keep=()):
    """The stack `key` ("layers", "global_layers") over x [N, S, Dv] -> (x, the outputs of the layers in `keep`
    [len(keep), N, S, Dv], in `keep` order; None when keep is empty)."""
    count = config.vision.num_global_layers if gated else config.vision.num_layers
    slots = jnp.array([keep.index(i) if i in keep else len(keep) for i in range(count)], jnp.int32)
    kept = jnp.zeros((len(keep) + 1,) + x.shape, x.dtype) if keep else None
    stack = nn.scan(VisionLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=(0, nn.broadcast), length=count, metadata_params={nn.PARTITION_NAME: spec.LAYERS})
    (x, kept), _ = stack(config, f"vision/{key}", gated, name=key)((x, kept), slots, mask)
    return x, (kept[:len(keep)] if keep else None)


class TileEmbedding(nn.Module):
    """A gated embedding per aspect-ratio id, one vector per tile, added to each of the tile's tokens
    (transformers' MllamaPrecomputedAspectRatioEmbedding; `spec_name` "vision/pre_tile_pos" or "post_...")."""

    config: LlamaConfig
    spec_name: str

    @nn.compact
    def __call__(self, x, ids):  # x [N, T, P', Dv], ids [N] -> [N, T, P', Dv]
        table = spec_param(self, f"{self.spec_name}/embedding")
        gate = jnp.tanh(spec_param(self, f"{self.spec_name}/gate"))
        emb = jnp.take(table, ids, axis=0).reshape(x.shape[0], x.shape[1], 1, x.shape[3])
        return x + (emb * gate).astype(x.dtype)


class PositionEmbedding(nn.Module):
    """(1 - tanh g) x a position embedding per token + tanh g x a tile-and-position embedding per aspect-ratio id
    (transformers' MllamaPrecomputedPositionEmbedding)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, ids):  # x [N, T, P, Dv], ids [N] -> [N, T, P, Dv]
        gate = jnp.tanh(spec_param(self, "vision/pos_embedding/gate"))
        pos = spec_param(self, "vision/pos_embedding/embedding")  # [P, Dv]
        tiles = jnp.take(spec_param(self, "vision/pos_embedding/tile_embedding"), ids, axis=0)
        tiles = tiles.reshape(x.shape)
        return x + ((1 - gate) * pos).astype(x.dtype) + (gate * tiles).astype(x.dtype)


def _attention_mask(aspect_ratio_mask, tokens: int, padded: int):
    """[N, T] tile mask -> [N, S, S] bool: False only where query and key are both padding (as transformers'
    _prepare_aspect_ratio_attention_mask: a product of the two inverted masks)."""
    n, t = aspect_ratio_mask.shape
    real_token = jnp.arange(padded) < tokens  # [P8]
    valid = (aspect_ratio_mask[:, :, None] != 0) & real_token[None, None]  # [N, T, P8]
    valid = valid.reshape(n, t * padded)
    return valid[:, :, None] | valid[:, None, :]


def check_image_inputs(config: LlamaConfig, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
    """The shapes the encoder needs (one line naming the array otherwise)."""
    v = config.vision
    if v is None:
        raise ImageError(f"pixel_values given to a text-only model ({config.name or 'this config'} has no vision "
                         "config)")
    expected = (v.max_num_tiles, v.num_channels, v.image_size, v.image_size)
    shape = tuple(pixel_values.shape)
    if len(shape) != 6 or shape[2:] != expected:
        raise ImageError(f"pixel_values has shape {list(shape)}, expected [batch, images, "
                         f"{', '.join(map(str, expected))}] (tiles, channels, height, width) for this model")
    if tuple(aspect_ratio_ids.shape) != shape[:2]:
        raise ImageError(f"aspect_ratio_ids has shape {list(aspect_ratio_ids.shape)}, expected {list(shape[:2])} "
                         "(batch, images) as pixel_values")
    if tuple(aspect_ratio_mask.shape) != shape[:3]:
        raise ImageError(f"aspect_ratio_mask has shape {list(aspect_ratio_mask.shape)}, expected "
                         f"{list(shape[:3])} (batch, images, tiles) as pixel_values")
    if not isinstance(aspect_ratio_ids, jax.core.Tracer):  # concrete ids: an id past the table would read NaN
        ids = np.asarray(aspect_ratio_ids)
        if ids.size and (ids.min() < 0 or ids.max() > v.max_aspect_ratio_id):
            raise ImageError(f"aspect_ratio_ids holds {int(ids.min()) if ids.min() < 0 else int(ids.max())}, "
                             f"expected ids in [0, {v.max_aspect_ratio_id}] (0: no image; 1..: one of the "
                             f"{v.max_aspect_ratio_id} supported aspect ratios)")


class VisionEncoder(nn.Module):
    """The ViT (name it "vision"): (pixel_values [B, I, T, C, H, W], aspect_ratio_ids [B, I], aspect_ratio_mask
    [B, I, T]) -> [B, I, T, P, O] in config.dtype, transformers' MllamaVisionModel(...).last_hidden_state."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
        cfg, v = self.config, self.config.vision
        check_image_inputs(cfg, pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        dt = dtype_of(cfg.dtype)
        b, i, t, c, _, _ = pixel_values.shape
        n, side, p, tokens = b * i, v.patches_per_side, v.patch_size, v.num_patches
        ids = aspect_ratio_ids.reshape(n).astype(jnp.int32)

        # Patches: the stride-p convolution as a matmul over each patch's [C, p, p] pixels, row-major patches.
        pixels = pixel_values.astype(dt).reshape(n * t, c, side, p, side, p).transpose(0, 2, 4, 1, 3, 5)
        x = dense(pixels, spec_param(self, "vision/patch_embedding").astype(dt), contract=3)  # [N*T, h, w, Dv]
        x = TileEmbedding(cfg, "vision/pre_tile_pos", name="pre_tile_pos")(x.reshape(n, t, side * side, -1), ids)
        cls = jnp.broadcast_to(spec_param(self, "vision/class_embedding").astype(dt), (n, t, 1, v.hidden_size))
        x = PositionEmbedding(cfg, name="pos_embedding")(jnp.concatenate([cls, x], axis=2), ids)  # [N, T, P, Dv]
        x = LayerNorm(cfg, "vision/ln_pre", _TORCH_LAYERNORM_EPS, name="ln_pre")(x)

        # Pad each tile to a multiple of 8 tokens (both references do; the padding is masked and sliced off).
        padded = _pad_to_8(tokens)
        x = jnp.pad(x, ((0, 0), (0, 0), (0, padded - tokens), (0, 0))).reshape(n, t * padded, v.hidden_size)
        mask = _attention_mask(aspect_ratio_mask.reshape(n, t), tokens, padded)

        x, kept = _run_layers(cfg, "layers", False, x, mask, keep=v.intermediate_layers_indices)
        x = LayerNorm(cfg, "vision/ln_post", _TORCH_LAYERNORM_EPS, name="ln_post")(x)
        x = TileEmbedding(cfg, "vision/post_tile_pos", name="post_tile_pos")(x.reshape(n, t, padded, -1), ids)
        x, _ = _run_layers(cfg, "global_layers", True, x.reshape(n, t * padded, -1), mask)

        inter = jnp.moveaxis(kept, 0, -1)  # [N, S, Dv, n]: features interleaved as torch.stack(dim=-1) makes them
        out = jnp.concatenate([x.reshape(n, t, padded, -1), inter.reshape(n, t, padded, -1)], axis=-1)
        return out[:, :, :tokens].reshape(b, i, t, tokens, v.vision_output_dim)


class Projector(nn.Module):
    """The multi-modal projector (name it "projector"): [B, I, T, P, O] -> cross-attention states
    [B, I*T*P, D] in config.dtype (transformers' multi_modal_projector + MllamaModel's reshape)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, features):
        dt = dtype_of(self.config.dtype)
        kernel = spec_param(self, "projector/kernel").astype(dt)
        bias = spec_param(self, "projector/bias").astype(dt)
        out = dense(features.astype(dt), kernel) + bias
        return out.reshape(features.shape[0], -1, self.config.hidden_size)


class _ImageStates(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
        features = VisionEncoder(self.config, name="vision")(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        return Projector(self.config, name="projector")(features)


def cross_attention_states(params, config: LlamaConfig, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
    """The text model's cross-attention states [B, I*T*P, D] (config.dtype) from the full parameter tree (its
    "vision" and "projector" entries) and the processor's image arrays (shapes in the module docstring)."""
    check_image_inputs(config, pixel_values, aspect_ratio_ids, aspect_ratio_mask)
    tree = {"vision": params["vision"], "projector": params["projector"]}
    return _ImageStates(config).apply({"params": tree}, jnp.asarray(pixel_values), jnp.asarray(aspect_ratio_ids),
                                      jnp.asarray(aspect_ratio_mask))
