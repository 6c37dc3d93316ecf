"""LoRA: low-rank adapters on the attention and MLP projections; only the adapters train.

For a target kernel W (stacked over layers, e.g. attn/q [L, D, N, H]) with input dims I and output dims O,
the adapter is A [L, I..., r] and B [L, r, O...]; the adapted kernel is W + (alpha / r) * A @ B. B starts at
zero, so training starts from the base model exactly. The base stays frozen (`TrainState.frozen`), as float
weights or, for QLoRA, quantized (`model/quantize.py`: int8 or NF4). The trainer's `combine` puts a
`LoraWeight` where each targeted kernel was: the model reads every kernel through `.astype(compute dtype)`,
which forms W + delta there, inside the layer scan, one layer at a time (a quantized W is dequantized there
too), so no adapted or dequantized copy of the whole model exists. `merge` writes the adapted kernels into a
plain parameter tree that the converter exports like any other checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from llama_jax.config import LlamaConfig
from llama_jax.errors import ConfigError
from llama_jax.model import spec
from llama_jax.model.quantize import is_quantized

# target -> (module, kernel name, number of input dims after the layer axis), from the spec's LoRA column
TARGETS: Dict[str, Tuple[str, str, int]] = {t: (p.path[1], p.path[2], p.inputs) for t, p in spec.lora_targets().items()}


def _check(targets: Sequence[str], rank: int):
    bad = sorted(set(targets) - set(TARGETS))
    if bad or not targets:
        raise ConfigError(f"LoRA targets {list(targets)}: expected a non-empty subset of {list(TARGETS)}")
    if rank <= 0:
        raise ConfigError(f"LoRA rank={rank}: expected a positive integer")


def _split(shape, n_in):
    """Kernel shape [L, *in, *out] -> (L, in dims, out dims)."""
    return shape[0], tuple(shape[1:1 + n_in]), tuple(shape[1 + n_in:])


def lora_shapes(config: LlamaConfig, rank: int, targets: Sequence[str], dtype=jnp.float32) -> dict:
    """{"layers": {module: {kernel: {"a": [L, I..., r], "b": [L, r, O...]}}}} as ShapeDtypeStructs."""
    from llama_jax.model.transformer import param_shapes

    _check(targets, rank)
    base = param_shapes(config)["layers"]
    out: dict = {"layers": {}}
    for t in targets:
        module, name, n_in = TARGETS[t]
        layers, ins, outs = _split(base[module][name].shape, n_in)
        out["layers"].setdefault(module, {})[name] = {
            "a": jax.ShapeDtypeStruct((layers, *ins, rank), dtype),
            "b": jax.ShapeDtypeStruct((layers, rank, *outs), dtype)}
    return out


def lora_shardings(config: LlamaConfig, rank: int, targets: Sequence[str], mesh: Mesh, rules=None) -> dict:
    """NamedShardings of the adapters: A's input dims and B's output dims split like the kernel's."""
    from llama_jax.model.transformer import logical_axes
    from llama_jax.parallel.sharding import DEFAULT_RULES, logical_to_spec

    rules = rules or DEFAULT_RULES
    axes = logical_axes(config)["layers"]
    shapes = lora_shapes(config, rank, targets)

    def one(path, leaf):
        module, name, which = (str(getattr(k, "key", k)) for k in path[1:])
        kernel_axes = tuple(axes[module][name])
        n_in = TARGETS[next(t for t, v in TARGETS.items() if v[:2] == (module, name))][2]
        logical = ((kernel_axes[0], *kernel_axes[1:1 + n_in], None) if which == "a"
                   else (kernel_axes[0], None, *kernel_axes[1 + n_in:]))
        return NamedSharding(mesh, logical_to_spec(logical, leaf.shape, mesh, rules, f"lora/{module}/{name}/{which}"))

    return jax.tree_util.tree_map_with_path(one, shapes)


def init_lora(config: LlamaConfig, rank: int, targets: Sequence[str], rng: jax.Array, dtype=jnp.float32) -> dict:
    """Adapters at the start of training: A ~ N(0, 1/fan_in), B = 0 (so the adapted model is the base)."""
    shapes = lora_shapes(config, rank, targets, dtype)
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(rng, len(leaves))
    out = []
    for key, (path, leaf) in zip(keys, jax.tree_util.tree_flatten_with_path(shapes)[0]):
        if str(path[-1].key) == "a":
            fan_in = math.prod(leaf.shape[1:-1])
            out.append(jax.random.normal(key, leaf.shape, dtype) / math.sqrt(fan_in))
        else:
            out.append(jnp.zeros(leaf.shape, dtype))
    return jax.tree.unflatten(treedef, out)


def delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """scale * A @ B per layer: a [L, I..., r], b [L, r, O...] -> [L, I..., O...] float32."""
    layers, rank = a.shape[0], a.shape[-1]
    a2 = a.reshape(layers, -1, rank).astype(jnp.float32)       # [L, I, r]
    b2 = b.reshape(layers, rank, -1).astype(jnp.float32)       # [L, r, O]
    d = jnp.einsum("LIR,LRO->LIO", a2, b2) * scale              # [L, I, O]
    return d.reshape(a.shape[:-1] + b.shape[2:])


def apply_lora(base: dict, lora: dict, alpha: float) -> dict:
    """The adapted parameter tree: each targeted kernel W -> W + (alpha/r) A @ B, in W's dtype. Works under
    jit (the trainer's `combine`) and outside it (`merge`)."""
    layers = dict(base["layers"])
    for module, kernels in lora["layers"].items():
        mod = dict(layers[module])
        for name, ab in kernels.items():
            w = mod[name]
            scale = alpha / ab["a"].shape[-1]
            mod[name] = (w.astype(jnp.float32) + delta(ab["a"], ab["b"], scale)).astype(w.dtype)
        layers[module] = mod
    return {**base, "layers": layers}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeight:
    """A targeted kernel as the model sees it during training: `base` W (float, QArray or NF4Array) with its
    adapters. Under the layer scan each leaf is one layer's: W [I..., O...], a [I..., r], b [r, O...]."""

    base: Any
    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self):
        return self.base.shape

    @property
    def ndim(self) -> int:
        return len(self.base.shape)

    @property
    def dtype(self):
        return self.a.dtype if is_quantized(self.base) else self.base.dtype

    def astype(self, dtype) -> jax.Array:
        """W + scale * A @ B in `dtype` (float32 sum; rounded to W's dtype first when W is float, as `merge`)."""
        rank = self.a.shape[-1]
        d = jnp.dot(self.a.reshape(-1, rank).astype(jnp.float32), self.b.reshape(rank, -1).astype(jnp.float32))
        w = self.base.astype(jnp.float32) + d.reshape(self.shape) * self.scale
        return w.astype(dtype if is_quantized(self.base) else self.base.dtype).astype(dtype)


def adapted(base: dict, lora: dict, alpha: float) -> dict:
    """The parameter tree the model runs during training: each targeted kernel a `LoraWeight`."""
    layers = dict(base["layers"])
    for module, kernels in lora["layers"].items():
        mod = dict(layers[module])
        for name, ab in kernels.items():
            mod[name] = LoraWeight(mod[name], ab["a"], ab["b"], alpha / ab["a"].shape[-1])
        layers[module] = mod
    return {**base, "layers": layers}


def make_combine(alpha: float):
    """`combine(lora, base)` for `train_step.make_train_step`: the trained tree is the adapters."""
    return lambda lora, base: adapted(base, lora, alpha)


def dequantize(tree: dict, dtype) -> dict:
    """`tree` with every quantized weight (QArray, NF4Array) dequantized into `dtype`."""
    return jax.tree.map(lambda x: x.astype(dtype) if is_quantized(x) else x, tree, is_leaf=is_quantized)


def merge(base: dict, lora: dict, alpha: float, dtype: Optional[Any] = None) -> dict:
    """Adapters folded into the base weights: a plain parameter tree (export it like any checkpoint). A
    quantized base is dequantized into `dtype` first (the run's param dtype; default bfloat16)."""
    if any(is_quantized(x) for x in jax.tree.leaves(base, is_leaf=is_quantized)):
        dtype = jnp.dtype(dtype or jnp.bfloat16)
        return jax.jit(lambda b, l: apply_lora(dequantize(b, dtype), l, alpha))(base, lora)
    return jax.jit(apply_lora, static_argnums=2)(base, lora, alpha)
