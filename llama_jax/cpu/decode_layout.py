"""The CPU decoding layout: an opt-in layer on top of the core model, for sampling on a CPU.

Inside a compiled decode loop the scanned model (`model.transformer.Llama`) slices every layer's weights out of
the stacked [L, ...] arrays at every step, and XLA:CPU copies each slice before the matmul reads it, about tripling
the memory traffic of a step that should read each weight once. TPU and GPU compilers read the slices in place,
and training wants the scan (compile time flat in depth), so the core keeps the stacked layout and this layer
adds, for the Sampler on a CPU (BENCHMARKS.md has the figures):

    unstack_layers(params, fuse)   one parameter buffer per layer (`layers_0` ..), q/k/v and gate/up joined
    init_per_layer_cache           one cache buffer per layer (at batch 1 without the batch axis)
    PerLayerLlama                  the same model over such parameters and caches (same numbers as Llama)

Legend: B batch, T length, D model dim, N/K query/kv heads, H head dim, F MLP hidden, L layers.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.config import LlamaConfig, dtype_of
from llama_jax.model.attention import attend_and_project, rotate, starts_at_zero, write_slots
from llama_jax.model.layers import RMSNorm, dense, gated_down
from llama_jax.model.spec import LAYERS
from llama_jax.model.transformer import CACHE_AXES, Llama, cache_shapes, init_cache, remat_block


def unstack_layers(params: dict, fuse: bool = False) -> dict:
    """The parameter tree with the stacked `layers` [L, ...] split into `layers_0` .. `layers_{L-1}`, one
    buffer per layer, for `PerLayerLlama` (same numbers as `Llama` on the stacked tree).

    `fuse`: also join each layer's q, k and v into one `qkv` weight [D, (N + 2K)·H] and gate and up into one
    `gate_up` [D, 2F] (int8 weights too): at batch 1, fewer and wider matrix-vector products read memory
    faster on a CPU (bench-135m: 7% of a decode step)."""
    if LAYERS not in params:
        raise KeyError(f"unstack_layers: expected a {LAYERS!r} entry (the stacked blocks); found {sorted(params)}")
    depth = jax.tree.leaves(params[LAYERS])[0].shape[0]
    out = {k: v for k, v in params.items() if k != LAYERS}
    for i in range(depth):
        layer = jax.tree.map(lambda a, i=i: a[i], params[LAYERS])
        if fuse:
            attn, mlp = dict(layer["attn"]), dict(layer["mlp"])
            attn["qkv"] = _join([attn.pop(n) for n in ("q", "k", "v")])
            mlp["gate_up"] = _join([mlp.pop(n) for n in ("gate", "up")])
            layer = {**layer, "attn": attn, "mlp": mlp}
        out[f"{LAYERS}_{i}"] = layer
    return out


def is_per_layer(params: dict) -> bool:
    """Whether `params` are in this layout (`unstack_layers`) rather than stacked."""
    return LAYERS not in params and f"{LAYERS}_0" in params


def _join(weights: list):
    """Input-side weights [D, ...] (arrays or int8 QArrays) as one [D, sum of their output sizes]."""
    from llama_jax.model.quantize import QArray

    if isinstance(weights[0], QArray):  # one scale per output channel: the scales join like the values
        return QArray(_join([w.q for w in weights]), _join([w.scale for w in weights]))
    return jnp.concatenate([w.reshape(w.shape[0], -1) for w in weights], axis=1)


# ---------------------------------------------------------------------------------------------- the cache
def per_layer_cache_axes(batch: int) -> dict:
    """The logical axes of each layer's buffer of `init_per_layer_cache(config, batch, ...)`."""
    return {n: axes[2:] if batch == 1 else axes[1:] for n, axes in CACHE_AXES.items()}


def init_per_layer_cache(config: LlamaConfig, batch: int, max_len: int, dtype=None) -> dict:
    """{"k": (L buffers), "v": (L buffers)}. Each layer updates and reads its own buffer in place; slicing layer
    i out of one stacked array copies it, and at batch 8 such copies cost a CPU decode step about 10%. At batch
    1 the buffers drop the batch axis: XLA:CPU otherwise fuses the in-place update once more into the product
    that reads it without that unit axis, which costs a copy of every layer's cache at every step (13% of a
    batch-1 step)."""
    dt = jnp.dtype(dtype) if dtype is not None else dtype_of(config.dtype)
    shapes = {n: shape[1:] if batch == 1 else shape for n, shape in cache_shapes(config, batch, max_len).items()}
    return {n: tuple(jnp.zeros(shape, dt) for _ in range(config.num_layers)) for n, shape in shapes.items()}


def _is_per_layer_cache(cache: dict) -> bool:
    return isinstance(cache["k"], (list, tuple))


# ---------------------------------------------------------------------------------------------- the model
class PerLayerAttention(nn.Module):
    """The core attention over one layer's own buffers: q/k/v joined (`qkv`) or not, and a per-layer cache whose
    updated buffers it returns (`return_cache`) so the update is made once, in place."""

    config: LlamaConfig
    return_cache: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
        cfg = self.config
        dt, n, kvh, h = dtype_of(cfg.dtype), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        weight = lambda name: self.get_variable("params", name).astype(dt)  # noqa: E731
        if self.has_variable("params", "qkv"):
            qkv = dense(x, weight("qkv"))  # BTD,D(N+2K)H->BT(N+2K)H
            q, k, v = jnp.split(qkv.reshape(qkv.shape[:2] + (n + 2 * kvh, h)), [n, n + kvh], axis=2)
        else:
            q, k, v = (dense(x, weight(name)) for name in ("q", "k", "v"))
        q, k, v = rotate(q, k, v, cos, sin)
        new_kv = None
        if cache is not None:
            new_kv = {"k": k.astype(cache["k"].dtype), "v": v.astype(cache["v"].dtype)}
            squeezed = cache["k"].ndim == 3  # a per-layer cache at batch 1 (see init_per_layer_cache)
            full = write_slots(cache, {n: a[0] for n, a in new_kv.items()} if squeezed else new_kv, cache_index)
            k, v = (full[n][None] if squeezed else full[n] for n in ("k", "v"))
            k, v = k.astype(dt), v.astype(dt)  # [B, K, H, S], [B, K, S, H]
            if self.return_cache:
                new_kv = full
        return attend_and_project(q, k, v, mask, weight("o"), starts_at_zero(cache, cache_index)), new_kv


class PerLayerMLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        dt, f = dtype_of(self.config.dtype), self.config.intermediate_size
        weight = lambda name: self.get_variable("params", name).astype(dt)  # noqa: E731
        if self.has_variable("params", "gate_up"):
            gate_up = dense(x, weight("gate_up"))  # BTD,D(2F)->BT(2F)
            gate, up = gate_up[..., :f], gate_up[..., f:]
        else:
            gate, up = dense(x, weight("gate")), dense(x, weight("up"))
        return gated_down(gate, up, weight("down"))


class PerLayerBlock(nn.Module):
    """The core Block's computation over one layer's buffers."""

    config: LlamaConfig
    return_cache: bool = False

    @nn.compact
    def __call__(self, x, layer_cache, cos, sin, mask, cache_index):
        cfg = self.config
        h, new_kv = PerLayerAttention(cfg, return_cache=self.return_cache, name="attn")(
            RMSNorm(cfg, "layers/attn_norm/scale", name="attn_norm")(x), cos, sin, mask, layer_cache, cache_index)
        x = x + h
        x = x + PerLayerMLP(cfg, name="mlp")(RMSNorm(cfg, "layers/mlp_norm/scale", name="mlp_norm")(x))
        return x, new_kv


class PerLayerLlama(Llama):
    """`Llama` over `unstack_layers` parameters: the blocks run one after another, each on its own buffers; the
    cache may be stacked (`init_cache`) or per layer (`init_per_layer_cache`)."""

    def blocks(self, x, cache, cos, sin, mask, cache_index):
        cfg = self.config
        per_layer = cache is not None and _is_per_layer_cache(cache)
        new_kv = []
        for i in range(cfg.num_layers):
            layer_cache = None if cache is None else {"k": cache["k"][i], "v": cache["v"][i]}
            x, kv = remat_block(PerLayerBlock, cfg)(cfg, return_cache=per_layer, name=f"{LAYERS}_{i}")(
                x, layer_cache, cos, sin, mask, cache_index)
            new_kv.append(kv)
        if cache is None:
            return x, None
        if per_layer:
            return x, {n: tuple(kv[n] for kv in new_kv) for n in ("k", "v")}
        stacked = {n: jnp.stack([kv[n] for kv in new_kv]) for n in ("k", "v")}
        return x, write_slots(cache, stacked, cache_index)

    @staticmethod
    def cache_length(cache: dict) -> int:
        return (cache["v"][0] if _is_per_layer_cache(cache) else cache["v"]).shape[-2]  # v: [(L,) B, K, S, H]


def decoding_model(config: LlamaConfig, params: dict):
    """(model, init_cache(config, batch, max_len, dtype=None)) for `params` in either layout: the core Llama with
    a stacked cache, or PerLayerLlama with a per-layer cache."""
    if is_per_layer(params):
        return PerLayerLlama(config), init_per_layer_cache
    return Llama(config), init_cache
