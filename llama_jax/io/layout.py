"""The one table between checkpoint tensor names and llama_jax's stacked parameter layout.

Hugging Face stores torch Linear weights as [out, in]; we store [in, out] with heads split out (see the
layout in model.py). Meta's original checkpoints additionally use interleaved RoPE pairs for wq/wk, which
`meta_to_hf_rotary` turns into HF's half-split order. Every transform checks its input shape first so a bad
tensor is reported by name instead of failing in a reshape.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator, Optional, Tuple

import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.errors import LayoutError  # noqa: F401 (also re-exported)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One checkpoint tensor: where it goes (`path` in the param tree, `layer` index into the stacked axis
    or None) and how it is reshaped (`kind`)."""

    hf_name: str
    path: Tuple[str, ...]
    layer: Optional[int]
    kind: str


_LAYER_TENSORS = (
    # (HF suffix under model.layers.{i}., our path under layers/, kind)
    ("self_attn.q_proj.weight", ("attn", "q"), "q"),
    ("self_attn.k_proj.weight", ("attn", "k"), "kv"),
    ("self_attn.v_proj.weight", ("attn", "v"), "kv"),
    ("self_attn.o_proj.weight", ("attn", "o"), "o"),
    ("mlp.gate_proj.weight", ("mlp", "gate"), "linear"),
    ("mlp.up_proj.weight", ("mlp", "up"), "linear"),
    ("mlp.down_proj.weight", ("mlp", "down"), "linear"),
    ("input_layernorm.weight", ("attn_norm", "scale"), "norm"),
    ("post_attention_layernorm.weight", ("mlp_norm", "scale"), "norm"),
)

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def hf_entries(config: LlamaConfig) -> Iterator[Entry]:
    """Every tensor a HF Llama checkpoint of this config must hold, in file order."""
    yield Entry("model.embed_tokens.weight", ("embed", "embedding"), None, "embed")
    for i in range(config.num_layers):
        for suffix, path, kind in _LAYER_TENSORS:
            yield Entry(f"model.layers.{i}.{suffix}", ("layers",) + path, i, kind)
    yield Entry("model.norm.weight", ("final_norm", "scale"), None, "norm")
    if not config.tie_word_embeddings:
        yield Entry("lm_head.weight", ("lm_head",), None, "lm_head")


def hf_shape(entry: Entry, config: LlamaConfig) -> Tuple[int, ...]:
    """The shape the HF tensor must have."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    n, k, h = config.num_heads, config.num_kv_heads, config.head_dim
    name = entry.hf_name
    if entry.kind in ("embed", "lm_head"):
        return (v, d)
    if entry.kind == "norm":
        return (d,)
    if entry.kind == "q":
        return (n * h, d)
    if entry.kind == "kv":
        return (k * h, d)
    if entry.kind == "o":
        return (d, n * h)
    return (d, f) if name.endswith("down_proj.weight") else (f, d)


def check_shape(entry: Entry, array_shape, config: LlamaConfig, source: str = "") -> None:
    expected = hf_shape(entry, config)
    if tuple(array_shape) != expected:
        where = f"{source}: " if source else ""
        raise LayoutError(f"{where}tensor {entry.hf_name!r} has shape {tuple(array_shape)}, expected {expected} "
                          f"for this config (hidden_size={config.hidden_size}, num_heads={config.num_heads}, "
                          f"num_kv_heads={config.num_kv_heads}, head_dim={config.head_dim}, "
                          f"intermediate_size={config.intermediate_size}, vocab_size={config.vocab_size})")


def hf_to_ours(entry: Entry, w: np.ndarray, config: LlamaConfig) -> np.ndarray:
    """HF tensor -> our per-layer array (without the layer axis)."""
    d, h = config.hidden_size, config.head_dim
    if entry.kind in ("embed", "norm"):
        return w
    if entry.kind == "q":
        return w.T.reshape(d, config.num_heads, h)
    if entry.kind == "kv":
        return w.T.reshape(d, config.num_kv_heads, h)
    if entry.kind == "o":
        return w.T.reshape(config.num_heads, h, d)
    return w.T  # linear, lm_head


def ours_to_hf(entry: Entry, w: np.ndarray, config: LlamaConfig) -> np.ndarray:
    """Our per-layer array -> the HF tensor (inverse of hf_to_ours)."""
    d, h = config.hidden_size, config.head_dim
    if entry.kind in ("embed", "norm"):
        return w
    if entry.kind == "q":
        return w.reshape(d, config.num_heads * h).T
    if entry.kind == "kv":
        return w.reshape(d, config.num_kv_heads * h).T
    if entry.kind == "o":
        return w.reshape(config.num_heads * h, d).T
    return w.T


def meta_to_hf_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Meta's wq/wk rows pair rotary dims as (0,1),(2,3)...; HF's pair (0,H/2),(1,H/2+1)... Reorder rows."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def hf_to_meta_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of meta_to_hf_rotary."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


# Meta consolidated.NN.pth names -> (HF name template, axis along which model-parallel shards are cut;
# None = replicated in every shard).
META_TENSORS = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
META_IGNORED = ("rope.freqs",)
_META_TOP_LEVEL = ("tok_embeddings.weight", "norm.weight", "output.weight")
_META_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def meta_name_to_hf(name: str) -> Tuple[str, Optional[int]]:
    """Meta tensor name -> (HF tensor name, model-parallel concat axis or None). KeyError if unknown."""
    m = _META_LAYER_RE.match(name)
    if m:
        hf_suffix, axis = META_TENSORS[m.group(2)]
        return f"model.layers.{m.group(1)}.{hf_suffix}", axis
    if name not in _META_TOP_LEVEL:
        raise KeyError(name)
    return META_TENSORS[name]
