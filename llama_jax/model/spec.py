"""The parameter spec: every tensor of a Llama model, stated once.

Each `Param` gives a tensor's place in the parameter tree, its shape as a function of the config, its logical
axes (sharding reads them through the rules table in `parallel/`), its initializer, its names in Hugging Face and
Meta checkpoints with the transforms between their layout and ours, and whether int8 and LoRA may take it. From
this one table come: the Flax modules' `param` calls (`create`), the shapes and logical axes of the whole tree
without tracing Flax (`param_shapes`, `logical_axes`), the converter in both directions and its checks
(`llama_jax.io`), the checkpoint's tree check, the int8 axes (`model.quantize`), the LoRA targets
(`training.lora`) and the parameter and FLOP counts (`model.flops`). `python -m llama_jax.model [PRESET]` prints
the table.

Legend: L layers, D model dim, N query heads, K kv heads, H head dim, F MLP hidden, V vocab.

Our layout: stacked tensors (path under "layers") carry the layer axis first ([L, ...], nn.scan). Matmul weights
are stored input dims first, heads split out ([D, N, H] for q; [N, H, D] for o), so `x @ W` contracts the leading
`inputs` dims. Hugging Face stores a torch Linear as [out, in] with heads flattened: ours.reshape(in, out).T.
Meta's consolidated.NN.pth files hold the same [out, in] matrices, cut across model-parallel shards (along
`meta_split` in Llama 2's reference; Llama 3's cuts the embedding by vocabulary instead, so io/meta.py decides
each tensor's axis from the shard shapes and the config), with q/k rows in Meta's interleaved rotary order
(see `meta_to_hf_rotary`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.errors import LayoutError

LAYERS = "layers"  # the path prefix (and logical axis name) of the stacked per-layer tensors

Shape = Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Stack:
    """A run of same-shaped layers stored stacked (layer axis first, logical axis "layers"): where its tensors
    live in the tree, how many layers a config has, and each layer's index in checkpoint names (Mllama numbers
    its self- and cross-attention layers together, so self layer i is not `layers.{i}` there)."""

    prefix: Tuple[str, ...]
    count: Callable[[LlamaConfig], int]
    hf_index: Callable[[LlamaConfig, int], int] = lambda config, i: i


STACKS: Tuple[Stack, ...] = (
    Stack((LAYERS,), lambda c: c.num_layers, lambda c, i: c.self_layer_hf_index(i) if c.cross_attention_layers else i),
    Stack(("cross_layers",), lambda c: len(c.cross_attention_layers), lambda c, i: c.cross_attention_layers[i]),
    Stack(("vision", "layers"), lambda c: c.vision.num_layers),
    Stack(("vision", "global_layers"), lambda c: c.vision.num_global_layers),
)


@dataclasses.dataclass(frozen=True)
class Param:
    """One tensor of the model. `shape` and `axes` are per layer for stacked tensors (the layer axis is added)."""

    path: Tuple[str, ...]                      # place in the parameter tree, e.g. ("layers", "attn", "q")
    shape: Callable[[LlamaConfig], Shape]      # our shape (per layer when stacked)
    axes: Tuple[str, ...]                      # logical axis names, one per dim of `shape`
    hf: str                                    # Hugging Face tensor name; "{i}" stands for the layer index
    meta: str                                  # Meta consolidated.NN.pth name; "{i}" likewise
    init: str = "normal"                       # "normal" (stddev initializer_range), "ones", "zeros", "gate" (pi/4)
    inputs: int = 0                            # matmul weights: how many leading dims x @ W contracts; 0: none
    meta_split: Optional[int] = None           # Llama 2's cut axis of the [out, in] matrix (printed; io/meta.py reads shapes)
    rotary_heads: Optional[str] = None         # config field: heads whose rows Meta stores in interleaved order
    quantize: bool = False                     # int8 weight-only candidate (one scale per output channel)
    lora: Optional[str] = None                 # the LoRA target name that adapts this weight
    present: Callable[[LlamaConfig], bool] = lambda config: True  # e.g. the output head only when untied
    hf_shape_of: Optional[Callable[[LlamaConfig], Shape]] = None  # the file's shape where it is not [out, in]
                                                                 # (a conv kernel [out, C, p, p])

    @property
    def name(self) -> str:
        """The path as one string, "layers/attn/q" (the key used in messages and lookups)."""
        return "/".join(self.path)

    @property
    def stack(self) -> Optional[Stack]:
        """The Stack this tensor belongs to (its path starts with the stack's prefix), or None."""
        return next((st for st in STACKS if self.path[:len(st.prefix)] == st.prefix), None)

    @property
    def stacked(self) -> bool:
        return self.stack is not None

    def num_stacked(self, config: LlamaConfig) -> Optional[int]:
        """Layers in this tensor's stack for `config` (None when not stacked)."""
        return self.stack.count(config) if self.stacked else None

    def hf_layer(self, config: LlamaConfig, i: int) -> int:
        """The checkpoint-name layer index ("{i}" in `hf`) of our stacked layer i."""
        return self.stack.hf_index(config, i)

    def hf_layers(self, config: LlamaConfig) -> Tuple[Optional[int], ...]:
        """The checkpoint-name layer index of each of our stacked layers, in our order; (None,) when unstacked."""
        if not self.stacked:
            return (None,)
        return tuple(self.hf_layer(config, i) for i in range(self.num_stacked(config)))

    def full_shape(self, config: LlamaConfig) -> Shape:
        return ((self.num_stacked(config),) if self.stacked else ()) + tuple(self.shape(config))

    def full_axes(self) -> Tuple[str, ...]:
        return ((LAYERS,) if self.stacked else ()) + self.axes

    def reduced_axes(self) -> Tuple[int, ...]:
        """Axes of the full array that a matmul sums over (its input dims): int8 keeps one scale per the rest."""
        first = 1 if self.stacked else 0
        return tuple(range(first, first + self.inputs))

    # -------------------------------------------------------------------------------- Hugging Face layout
    def hf_name(self, layer: Optional[int] = None) -> str:
        return self.hf.format(i=layer)

    def hf_shape(self, config: LlamaConfig) -> Shape:
        """The shape of one Hugging Face tensor: [out, in] with heads flattened for a matmul weight."""
        if self.hf_shape_of is not None:
            return tuple(self.hf_shape_of(config))
        shape = tuple(self.shape(config))
        if not self.inputs:
            return shape
        return (math.prod(shape[self.inputs:]), math.prod(shape[:self.inputs]))

    def from_hf(self, w: np.ndarray, config: LlamaConfig) -> np.ndarray:
        """A Hugging Face tensor (one layer's) -> ours."""
        return w.reshape(w.shape[0], -1).T.reshape(self.shape(config)) if self.inputs else w

    def to_hf(self, w: np.ndarray, config: LlamaConfig) -> np.ndarray:
        """Ours (one layer's) -> the Hugging Face tensor (inverse of from_hf)."""
        if not self.inputs:
            return w
        out = w.reshape(math.prod(w.shape[:self.inputs]), -1).T
        return out.reshape(self.hf_shape_of(config)) if self.hf_shape_of is not None else out

    def hf_row_axis(self) -> int:
        """The axis of our (unstacked) array whose blocks are blocks of Hugging Face rows: the output dim of a
        2-D matmul weight ([D, V] head: HF rows are our columns), axis 0 otherwise ([V, D] embedding)."""
        return self.inputs if self.inputs and len(self.axes) == self.inputs + 1 else 0

    def check_hf_shape(self, found: Shape, config: LlamaConfig, where: str = "", layer: Optional[int] = None):
        expected = self.hf_shape(config)
        if tuple(found) != expected:
            prefix = f"{where}: " if where else ""
            raise LayoutError(
                f"{prefix}tensor {self.hf_name(layer)!r} has shape {tuple(found)}, expected {expected} for this config "
                f"(hidden_size={config.hidden_size}, num_heads={config.num_heads}, num_kv_heads={config.num_kv_heads}, "
                f"head_dim={config.head_dim}, intermediate_size={config.intermediate_size}, "
                f"vocab_size={config.vocab_size})")


def _attn(heads: str):
    return lambda c: (c.hidden_size, getattr(c, heads), c.head_dim)


def _layer(name: str) -> str:
    return f"model.layers.{{i}}.{name}"


# The Llama decoder. The order is the Hugging Face file order (the export writes tensors in it).
LLAMA: Tuple[Param, ...] = (
    Param(("embed", "embedding"), lambda c: (c.embed_rows, c.hidden_size), ("vocab", "embed"),
          hf="model.embed_tokens.weight", meta="tok_embeddings.weight", meta_split=1),
    Param((LAYERS, "attn", "q"), _attn("num_heads"), ("embed", "heads", "head_dim"), inputs=1,
          hf=_layer("self_attn.q_proj.weight"), meta="layers.{i}.attention.wq.weight", meta_split=0,
          rotary_heads="num_heads", quantize=True, lora="q"),
    Param((LAYERS, "attn", "k"), _attn("num_kv_heads"), ("embed", "kv_heads", "head_dim"), inputs=1,
          hf=_layer("self_attn.k_proj.weight"), meta="layers.{i}.attention.wk.weight", meta_split=0,
          rotary_heads="num_kv_heads", quantize=True, lora="k"),
    Param((LAYERS, "attn", "v"), _attn("num_kv_heads"), ("embed", "kv_heads", "head_dim"), inputs=1,
          hf=_layer("self_attn.v_proj.weight"), meta="layers.{i}.attention.wv.weight", meta_split=0,
          quantize=True, lora="v"),
    Param((LAYERS, "attn", "o"), lambda c: (c.num_heads, c.head_dim, c.hidden_size), ("heads", "head_dim", "embed_out"),
          inputs=2, hf=_layer("self_attn.o_proj.weight"), meta="layers.{i}.attention.wo.weight", meta_split=1,
          quantize=True, lora="o"),
    Param((LAYERS, "mlp", "gate"), lambda c: (c.hidden_size, c.intermediate_size), ("embed", "mlp"), inputs=1,
          hf=_layer("mlp.gate_proj.weight"), meta="layers.{i}.feed_forward.w1.weight", meta_split=0,
          quantize=True, lora="gate"),
    Param((LAYERS, "mlp", "up"), lambda c: (c.hidden_size, c.intermediate_size), ("embed", "mlp"), inputs=1,
          hf=_layer("mlp.up_proj.weight"), meta="layers.{i}.feed_forward.w3.weight", meta_split=0,
          quantize=True, lora="up"),
    Param((LAYERS, "mlp", "down"), lambda c: (c.intermediate_size, c.hidden_size), ("mlp", "embed_out"), inputs=1,
          hf=_layer("mlp.down_proj.weight"), meta="layers.{i}.feed_forward.w2.weight", meta_split=1,
          quantize=True, lora="down"),
    Param((LAYERS, "attn_norm", "scale"), lambda c: (c.hidden_size,), ("norm",), init="ones",
          hf=_layer("input_layernorm.weight"), meta="layers.{i}.attention_norm.weight"),
    Param((LAYERS, "mlp_norm", "scale"), lambda c: (c.hidden_size,), ("norm",), init="ones",
          hf=_layer("post_attention_layernorm.weight"), meta="layers.{i}.ffn_norm.weight"),
    Param(("final_norm", "scale"), lambda c: (c.hidden_size,), ("norm",), init="ones",
          hf="model.norm.weight", meta="norm.weight"),
    Param(("lm_head",), lambda c: (c.hidden_size, c.vocab_size), ("embed", "vocab"), inputs=1,
          hf="lm_head.weight", meta="output.weight", meta_split=0, quantize=True,
          present=lambda c: not c.tie_word_embeddings),
)

# ------------------------------------------------------------------------------------ Llama 3.2 Vision (Mllama)
# The text model's tensors under Mllama's names (the layout of Meta's released Hub repos, which transformers also
# writes), gated cross-attention layers (HF numbers them among the self layers: cross_attention_layers), the
# ViT image encoder (`vision/`) and the projector into the text width. Legend adds: Dv vision width, Nv vision
# heads, Hv vision head dim, Fv vision MLP hidden, C channels, p patch side, P patches per tile + 1 (class
# token), A aspect-ratio ids + 1, T max tiles, O vision output dim. No Meta names: Meta's Vision .pth files are
# not read (the Hub repos are).
def _vision_text(p: Param) -> Param:
    return dataclasses.replace(p, hf="language_model." + p.hf, meta="", meta_split=None)


def _cross(name: str) -> str:
    return f"language_model.model.layers.{{i}}.{name}"


def _v(c: LlamaConfig):
    return c.vision


def _vision_layers(prefix: Tuple[str, ...], hf: str, gated: bool) -> Tuple[Param, ...]:
    """One ViT encoder layer stack (pre-LayerNorm, biased GELU MLP, unbiased attention); global layers add tanh
    gates on both residual branches."""
    name = lambda n: f"vision_model.{hf}.layers.{{i}}.{n}"  # noqa: E731
    attn = lambda c: (_v(c).hidden_size, _v(c).num_heads, _v(c).head_dim)  # noqa: E731
    rows = [Param(prefix + ("attn", k), attn, ("embed", "heads", "head_dim"), inputs=1,
                  hf=name(f"self_attn.{k}_proj.weight"), meta="") for k in ("q", "k", "v")]
    rows += [
        Param(prefix + ("attn", "o"), lambda c: (_v(c).num_heads, _v(c).head_dim, _v(c).hidden_size),
              ("heads", "head_dim", "embed_out"), inputs=2, hf=name("self_attn.o_proj.weight"), meta=""),
        Param(prefix + ("mlp", "fc1"), lambda c: (_v(c).hidden_size, _v(c).intermediate_size), ("embed", "mlp"),
              inputs=1, hf=name("mlp.fc1.weight"), meta=""),
        Param(prefix + ("mlp", "fc1_bias"), lambda c: (_v(c).intermediate_size,), ("mlp",), init="zeros",
              hf=name("mlp.fc1.bias"), meta=""),
        Param(prefix + ("mlp", "fc2"), lambda c: (_v(c).intermediate_size, _v(c).hidden_size), ("mlp", "embed_out"),
              inputs=1, hf=name("mlp.fc2.weight"), meta=""),
        Param(prefix + ("mlp", "fc2_bias"), lambda c: (_v(c).hidden_size,), ("norm",), init="zeros",
              hf=name("mlp.fc2.bias"), meta=""),
    ]
    for ours, theirs in (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")):
        rows += [Param(prefix + (ours, "scale"), lambda c: (_v(c).hidden_size,), ("norm",), init="ones",
                       hf=name(f"{theirs}.weight"), meta=""),
                 Param(prefix + (ours, "bias"), lambda c: (_v(c).hidden_size,), ("norm",), init="zeros",
                       hf=name(f"{theirs}.bias"), meta="")]
    if gated:
        rows += [Param(prefix + (g,), lambda c: (1,), ("norm",), init="gate", hf=name(g), meta="")
                 for g in ("gate_attn", "gate_ffn")]
    return tuple(rows)


_TILE_POS = lambda c: (_v(c).max_aspect_ratio_id + 1, _v(c).max_num_tiles * _v(c).hidden_size)  # noqa: E731

MLLAMA: Tuple[Param, ...] = tuple(_vision_text(p) for p in LLAMA) + (
    # Gated cross-attention layers: q/k RMS-normed per head, tanh gates (zero at init) on attention and MLP.
    Param(("cross_layers", "attn", "q"), _attn("num_heads"), ("embed", "heads", "head_dim"), inputs=1,
          hf=_cross("cross_attn.q_proj.weight"), meta="", quantize=True),
    Param(("cross_layers", "attn", "k"), _attn("num_kv_heads"), ("embed", "kv_heads", "head_dim"), inputs=1,
          hf=_cross("cross_attn.k_proj.weight"), meta="", quantize=True),
    Param(("cross_layers", "attn", "v"), _attn("num_kv_heads"), ("embed", "kv_heads", "head_dim"), inputs=1,
          hf=_cross("cross_attn.v_proj.weight"), meta="", quantize=True),
    Param(("cross_layers", "attn", "o"), lambda c: (c.num_heads, c.head_dim, c.hidden_size),
          ("heads", "head_dim", "embed_out"), inputs=2, hf=_cross("cross_attn.o_proj.weight"), meta="",
          quantize=True),
    Param(("cross_layers", "attn", "q_norm", "scale"), lambda c: (c.head_dim,), ("norm",), init="ones",
          hf=_cross("cross_attn.q_norm.weight"), meta=""),
    Param(("cross_layers", "attn", "k_norm", "scale"), lambda c: (c.head_dim,), ("norm",), init="ones",
          hf=_cross("cross_attn.k_norm.weight"), meta=""),
    Param(("cross_layers", "attn_gate"), lambda c: (1,), ("norm",), init="zeros",
          hf=_cross("cross_attn_attn_gate"), meta=""),
    Param(("cross_layers", "mlp", "gate"), lambda c: (c.hidden_size, c.intermediate_size), ("embed", "mlp"),
          inputs=1, hf=_cross("mlp.gate_proj.weight"), meta="", quantize=True),
    Param(("cross_layers", "mlp", "up"), lambda c: (c.hidden_size, c.intermediate_size), ("embed", "mlp"),
          inputs=1, hf=_cross("mlp.up_proj.weight"), meta="", quantize=True),
    Param(("cross_layers", "mlp", "down"), lambda c: (c.intermediate_size, c.hidden_size), ("mlp", "embed_out"),
          inputs=1, hf=_cross("mlp.down_proj.weight"), meta="", quantize=True),
    Param(("cross_layers", "mlp_gate"), lambda c: (1,), ("norm",), init="zeros",
          hf=_cross("cross_attn_mlp_gate"), meta=""),
    Param(("cross_layers", "attn_norm", "scale"), lambda c: (c.hidden_size,), ("norm",), init="ones",
          hf=_cross("input_layernorm.weight"), meta=""),
    Param(("cross_layers", "mlp_norm", "scale"), lambda c: (c.hidden_size,), ("norm",), init="ones",
          hf=_cross("post_attention_layernorm.weight"), meta=""),
    # The image encoder. Patches are cut by a stride-p convolution without bias: ours is the same map as a
    # matmul over [C, p, p] patch pixels (the file holds the conv kernel [Dv, C, p, p]).
    Param(("vision", "patch_embedding"), lambda c: (_v(c).num_channels, _v(c).patch_size, _v(c).patch_size,
                                                    _v(c).hidden_size),
          ("patch", "patch", "patch", "embed_out"), inputs=3, hf="vision_model.patch_embedding.weight", meta="",
          hf_shape_of=lambda c: (_v(c).hidden_size, _v(c).num_channels, _v(c).patch_size, _v(c).patch_size)),
    Param(("vision", "class_embedding"), lambda c: (_v(c).hidden_size,), ("norm",),
          hf="vision_model.class_embedding", meta=""),
    Param(("vision", "pos_embedding", "embedding"), lambda c: (_v(c).num_patches, _v(c).hidden_size),
          ("patch", "embed"), hf="vision_model.gated_positional_embedding.embedding", meta=""),
    Param(("vision", "pos_embedding", "gate"), lambda c: (1,), ("norm",), init="zeros",
          hf="vision_model.gated_positional_embedding.gate", meta=""),
    Param(("vision", "pos_embedding", "tile_embedding"),
          lambda c: (_v(c).max_aspect_ratio_id + 1, _v(c).max_num_tiles * _v(c).num_patches * _v(c).hidden_size),
          ("patch", "tile_embed"), hf="vision_model.gated_positional_embedding.tile_embedding.weight", meta=""),
    Param(("vision", "pre_tile_pos", "embedding"), _TILE_POS, ("patch", "tile_embed"),
          hf="vision_model.pre_tile_positional_embedding.embedding.weight", meta=""),
    Param(("vision", "pre_tile_pos", "gate"), lambda c: (1,), ("norm",), init="zeros",
          hf="vision_model.pre_tile_positional_embedding.gate", meta=""),
    Param(("vision", "post_tile_pos", "embedding"), _TILE_POS, ("patch", "tile_embed"),
          hf="vision_model.post_tile_positional_embedding.embedding.weight", meta=""),
    Param(("vision", "post_tile_pos", "gate"), lambda c: (1,), ("norm",), init="zeros",
          hf="vision_model.post_tile_positional_embedding.gate", meta=""),
    Param(("vision", "ln_pre", "scale"), lambda c: (_v(c).hidden_size,), ("norm",), init="ones",
          hf="vision_model.layernorm_pre.weight", meta=""),
    Param(("vision", "ln_pre", "bias"), lambda c: (_v(c).hidden_size,), ("norm",), init="zeros",
          hf="vision_model.layernorm_pre.bias", meta=""),
    Param(("vision", "ln_post", "scale"), lambda c: (_v(c).hidden_size,), ("norm",), init="ones",
          hf="vision_model.layernorm_post.weight", meta=""),
    Param(("vision", "ln_post", "bias"), lambda c: (_v(c).hidden_size,), ("norm",), init="zeros",
          hf="vision_model.layernorm_post.bias", meta=""),
) + _vision_layers(("vision", "layers"), "transformer", gated=False) + _vision_layers(
    ("vision", "global_layers"), "global_transformer", gated=True) + (
    Param(("projector", "kernel"), lambda c: (_v(c).vision_output_dim, c.hidden_size), ("mlp", "embed_out"),
          inputs=1, hf="multi_modal_projector.weight", meta=""),
    Param(("projector", "bias"), lambda c: (c.hidden_size,), ("norm",), init="zeros",
          hf="multi_modal_projector.bias", meta=""),
)

# The tree's layout name, recorded in every llama_jax checkpoint: a checkpoint of another layout is refused by
# name. Change it whenever a path, shape or axis order above changes.
PARAM_LAYOUT = "llama_jax/stacked-v1"

# Checkpoint tensors that are not parameters and are skipped on read: old HF rotary buffers, Meta's rope table.
HF_IGNORED = ("model.layers.{i}.self_attn.rotary_emb.inv_freq",)
META_IGNORED = ("rope.freqs",)

BY_NAME: Dict[str, Param] = {p.name: p for p in LLAMA}
MLLAMA_BY_NAME: Dict[str, Param] = {p.name: p for p in MLLAMA}
# Every tensor of every architecture (a path names the same shape and axes wherever it occurs).
ALL_PARAMS: Tuple[Param, ...] = LLAMA + tuple(p for p in MLLAMA if p.name not in BY_NAME)


def architecture(config: Optional[LlamaConfig]) -> Tuple[Param, ...]:
    """The Param table of `config`'s architecture: Llama, or Mllama (Llama 3.2 Vision) when it has a vision
    config."""
    return MLLAMA if config is not None and config.vision is not None else LLAMA


def params(config: LlamaConfig) -> Iterator[Param]:
    """The tensors a model of `config` has, in file order."""
    return (p for p in architecture(config) if p.present(config))


def get(name: str, config: Optional[LlamaConfig] = None) -> Param:
    """The Param at path `name` ("layers/attn/q") in `config`'s architecture (Llama's when no config)."""
    return (MLLAMA_BY_NAME if config is not None and config.vision is not None else BY_NAME)[name]


# ---------------------------------------------------------------------------------------------- derived trees
def nest(pairs) -> dict:
    """A nested dict from (path tuple, value) pairs."""
    tree: dict = {}
    for path, value in pairs:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def param_shapes(config: LlamaConfig, dtype=None) -> dict:
    """The parameter tree with jax.ShapeDtypeStruct leaves (in `dtype`, default config.param_dtype)."""
    import jax

    from llama_jax.config import dtype_of

    dt = dtype_of(dtype or config.param_dtype)
    return nest((p.path, jax.ShapeDtypeStruct(p.full_shape(config), dt)) for p in params(config))


def logical_axes(config: LlamaConfig) -> dict:
    """The parameter tree with a PartitionSpec of logical axis names at each leaf."""
    from jax.sharding import PartitionSpec

    return nest((p.path, PartitionSpec(*p.full_axes())) for p in params(config))


def _pattern(template: str) -> "re.Pattern":
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


_HF_PATTERNS = [(_pattern(p.hf), p) for p in LLAMA]
_MLLAMA_HF_PATTERNS = [(_pattern(p.hf), p) for p in MLLAMA]
_META_PATTERNS = [(_pattern(p.meta), p) for p in LLAMA]


def match_hf(name: str, config: Optional[LlamaConfig] = None) -> Optional[Tuple[Param, Optional[int]]]:
    """(Param, layer index in the name or None) of a Hugging Face tensor name, or None if it is not one of ours.
    For a vision config the index must also belong to the Param's stack: Mllama's `layers.{i}.input_layernorm`
    is a self-attention layer's or a cross-attention layer's depending on i."""
    if config is None or config.vision is None:
        return _match(name, _HF_PATTERNS)
    for pattern, p in _MLLAMA_HF_PATTERNS:
        m = pattern.match(name)
        if m and (not m.groups() or int(m.group(1)) in p.hf_layers(config)):
            return p, (int(m.group(1)) if m.groups() else None)
    return None


def match_meta(name: str) -> Optional[Tuple[Param, Optional[int]]]:
    """(Param, layer index or None) of a Meta consolidated.NN.pth tensor name, or None."""
    return _match(name, _META_PATTERNS)


def _match(name, patterns):
    for pattern, p in patterns:
        m = pattern.match(name)
        if m:
            return p, (int(m.group(1)) if m.groups() else None)
    return None


_HF_IGNORED_PATTERNS = [_pattern(t) for t in HF_IGNORED]


def is_ignored_hf(name: str) -> bool:
    return any(pattern.match(name) for pattern in _HF_IGNORED_PATTERNS)


def meta_to_hf_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Meta's wq/wk rows pair rotary dims as (0,1),(2,3)...; HF's pair (0,H/2),(1,H/2+1)... Reorder rows."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def hf_to_meta_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of meta_to_hf_rotary."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def lora_targets() -> Dict[str, Param]:
    """{target name: the weight it adapts}, e.g. {"q": <layers/attn/q>, ...}."""
    return {p.lora: p for p in LLAMA if p.lora}


def describe(config: LlamaConfig) -> str:
    """The spec as a table for `config` (path, shape, logical axes, Hugging Face name, int8, LoRA)."""
    rows = [("path", "shape", "logical axes", "Hugging Face", "Meta (split)", "int8", "LoRA")]
    for p in params(config):
        meta = p.meta + ("" if p.meta_split is None else f" ({p.meta_split})")
        rows.append((p.name, str(list(p.full_shape(config))), ", ".join(p.full_axes()), p.hf, meta,
                     "yes" if p.quantize else "", p.lora or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)

