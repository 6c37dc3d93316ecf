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
class Param:
    """One tensor of the model. `shape` and `axes` are per layer for stacked tensors (the layer axis is added)."""

    path: Tuple[str, ...]                      # place in the parameter tree, e.g. ("layers", "attn", "q")
    shape: Callable[[LlamaConfig], Shape]      # our shape (per layer when stacked)
    axes: Tuple[str, ...]                      # logical axis names, one per dim of `shape`
    hf: str                                    # Hugging Face tensor name; "{i}" stands for the layer index
    meta: str                                  # Meta consolidated.NN.pth name; "{i}" likewise
    init: str = "normal"                       # "normal" (stddev config.initializer_range) or "ones"
    inputs: int = 0                            # matmul weights: how many leading dims x @ W contracts; 0: none
    meta_split: Optional[int] = None           # Llama 2's cut axis of the [out, in] matrix (printed; io/meta.py reads shapes)
    rotary_heads: Optional[str] = None         # config field: heads whose rows Meta stores in interleaved order
    quantize: bool = False                     # int8 weight-only candidate (one scale per output channel)
    lora: Optional[str] = None                 # the LoRA target name that adapts this weight
    present: Callable[[LlamaConfig], bool] = lambda config: True  # e.g. the output head only when untied

    @property
    def name(self) -> str:
        """The path as one string, "layers/attn/q" (the key used in messages and lookups)."""
        return "/".join(self.path)

    @property
    def stacked(self) -> bool:
        return self.path[0] == LAYERS

    def full_shape(self, config: LlamaConfig) -> Shape:
        return ((config.num_layers,) if self.stacked else ()) + tuple(self.shape(config))

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
        shape = tuple(self.shape(config))
        if not self.inputs:
            return shape
        return (math.prod(shape[self.inputs:]), math.prod(shape[:self.inputs]))

    def from_hf(self, w: np.ndarray, config: LlamaConfig) -> np.ndarray:
        """A Hugging Face tensor (one layer's) -> ours."""
        return w.T.reshape(self.shape(config)) if self.inputs else w

    def to_hf(self, w: np.ndarray, config: LlamaConfig) -> np.ndarray:
        """Ours (one layer's) -> the Hugging Face tensor (inverse of from_hf)."""
        if not self.inputs:
            return w
        return w.reshape(math.prod(w.shape[:self.inputs]), -1).T

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
    Param(("embed", "embedding"), lambda c: (c.vocab_size, c.hidden_size), ("vocab", "embed"),
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

# The tree's layout name, recorded in every llama_jax checkpoint: a checkpoint of another layout is refused by
# name. Change it whenever a path, shape or axis order above changes.
PARAM_LAYOUT = "llama_jax/stacked-v1"

# Checkpoint tensors that are not parameters and are skipped on read: old HF rotary buffers, Meta's rope table.
HF_IGNORED = ("model.layers.{i}.self_attn.rotary_emb.inv_freq",)
META_IGNORED = ("rope.freqs",)

BY_NAME: Dict[str, Param] = {p.name: p for p in LLAMA}


def params(config: LlamaConfig) -> Iterator[Param]:
    """The tensors a model of `config` has, in file order."""
    return (p for p in LLAMA if p.present(config))


def get(name: str) -> Param:
    """The Param at path `name` ("layers/attn/q")."""
    return BY_NAME[name]


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
_META_PATTERNS = [(_pattern(p.meta), p) for p in LLAMA]


def match_hf(name: str) -> Optional[Tuple[Param, Optional[int]]]:
    """(Param, layer index or None) of a Hugging Face tensor name, or None if it is not one of ours."""
    return _match(name, _HF_PATTERNS)


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

