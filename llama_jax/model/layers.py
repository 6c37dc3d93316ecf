"""Building blocks: RMSNorm, the token embedding, the SwiGLU MLP.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`), so sharding is decided by
the rules table in `sharding.py`, never here. Legend: B batch, T length, D model dim, F MLP hidden, V vocab.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.config import LlamaConfig, dtype_of  # noqa: F401 (dtype_of: re-exported for the model files)
from llama_jax.model import spec


# Spec initializers other than "normal". "gate": Mllama's global vision layers start their tanh gates at pi/4.
_INITIALIZERS = {"ones": nn.initializers.ones, "zeros": nn.initializers.zeros,
                 "gate": nn.initializers.constant(math.pi / 4)}


def spec_param(module: nn.Module, name: str):
    """The parameter `name` of the spec ("layers/attn/q"), created by `module` (whose scope holds its last key)
    with the spec's shape, initializer and logical axis names (per layer: nn.scan adds the layer axis)."""
    cfg = module.config
    p = spec.get(name, cfg)
    init = _INITIALIZERS.get(p.init) or nn.initializers.normal(stddev=cfg.initializer_range)
    return module.param(p.path[-1], nn.with_logical_partitioning(init, p.axes), p.shape(cfg),
                        dtype_of(cfg.param_dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dense(x, w, contract: int, w_transposed: bool, out_dtype):
    n = x.ndim
    if w_transposed:  # w [*O, *C]: contract x's last dims with w's last dims
        dims = (tuple(range(n - contract, n)), tuple(range(w.ndim - contract, w.ndim)))
    else:  # w [*C, *O]: contract x's last dims with w's first dims
        dims = (tuple(range(n - contract, n)), tuple(range(contract)))
    return jax.lax.dot_general(x, w, (dims, ((), ())), preferred_element_type=out_dtype)


def _dense_fwd(x, w, contract, w_transposed, out_dtype):
    return _dense(x, w, contract, w_transposed, out_dtype), (x, w)


def _dense_bwd(contract, w_transposed, out_dtype, res, dy):
    # Both gradients as plain 2-D matmuls on [M, C] x [C, O] views (M = all leading dims of x). Left to
    # autodiff, XLA:CPU transposes the activation gradient [M, O] to [O, M] for the weight gradient and fuses
    # that transpose with the elementwise producers (SiLU backward, ...) into a loop that runs 10-40x slower
    # than memory speed; contracting M of both operands directly lets the matmul read them as they are.
    x, w = res
    c = math.prod(x.shape[x.ndim - contract:])
    o = w.size // c
    dt = jnp.promote_types(dy.dtype, w.dtype)
    x2, dy2 = x.reshape(-1, c), dy.reshape(-1, o).astype(dt)
    w2 = w.reshape(o, c) if w_transposed else w.reshape(c, o)
    w_out_dim = 0 if w_transposed else 1
    dx = jax.lax.dot_general(dy2, w2.astype(dt), (((1,), (w_out_dim,)), ((), ())))  # [M, C]
    if w_transposed:
        dw = jax.lax.dot_general(dy2, x2.astype(dt), (((0,), (0,)), ((), ())))  # [O, C]
    else:
        dw = jax.lax.dot_general(x2.astype(dt), dy2, (((0,), (0,)), ((), ())))  # [C, O]
    return dx.reshape(x.shape).astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


def dense(x: jnp.ndarray, w: jnp.ndarray, contract: int = 1, *, w_transposed: bool = False, out_dtype=None):
    """A projection: x [..., *C] times w [*C, *O] -> [..., *O], contracting the last `contract` dims of x with
    the first `contract` dims of w (with `w_transposed`, w is [*O, *C] and its last dims are contracted).

    The same numbers as the equivalent einsum, with a hand-written backward pass that keeps the weight
    gradient a plain matmul (see `_dense_bwd`). `out_dtype` is the matmul's preferred_element_type."""
    return _dense(x, w, contract, w_transposed, out_dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * scale, with the statistics in float32 (as transformers does). `spec_name`: the scale's path."""

    config: LlamaConfig
    spec_name: str

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:  # [..., D] -> [..., D]
        cfg = self.config
        scale = spec_param(self, self.spec_name)
        xf = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
        normed = (xf * jax.lax.rsqrt(variance + cfg.rms_norm_eps)).astype(dtype_of(cfg.dtype))
        return scale.astype(dtype_of(cfg.dtype)) * normed


class Embedding(nn.Module):
    """Token embedding [V, D]; `attend` reuses it as the output projection when embeddings are tied."""

    config: LlamaConfig

    def setup(self):
        self.embedding = spec_param(self, "embed/embedding")

    def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:  # [B, T] -> [B, T, D]
        # Gather the fsdp-split embed dimension first: a gather from a table split on both axes makes the
        # SPMD partitioner replicate the whole table ("involuntary full rematerialization").
        table = nn.with_logical_constraint(self.embedding, ("vocab", None))
        return jnp.take(table, tokens, axis=0).astype(dtype_of(self.config.dtype))

    def attend(self, x: jnp.ndarray) -> jnp.ndarray:  # [B, T, D] -> [B, T, V] float32
        emb = self.embedding.astype(dtype_of(self.config.dtype))
        return dense(x, emb, w_transposed=True, out_dtype=jnp.float32)  # BTD,VD->BTV


@jax.custom_vjp
def swiglu(gate: jnp.ndarray, up: jnp.ndarray) -> jnp.ndarray:
    """silu(gate) * up, elementwise. The backward saves only gate and up (autodiff saves four more arrays of the
    same [B, T, F] size for the sigmoid's pieces, each stacked over layers under nn.scan)."""
    return nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, d_h):
    gate, up = res
    sig = jax.nn.sigmoid(gate)
    d_gate = d_h * up * sig * (1 + gate * (1 - sig))  # d silu(g)/dg = sig + g sig (1 - sig)
    return d_gate.astype(gate.dtype), (d_h * gate * sig).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:  # [B, T, D] -> [B, T, D]
        cfg = self.config
        dt = dtype_of(cfg.dtype)
        gate = dense(x, spec_param(self, "layers/mlp/gate").astype(dt))  # BTD,DF->BTF
        up = dense(x, spec_param(self, "layers/mlp/up").astype(dt))
        return gated_down(gate, up, spec_param(self, "layers/mlp/down").astype(dt))


def gated_down(gate, up, down):
    """down(silu(gate) * up): gate, up [B, T, F], down [F, D] -> [B, T, D]."""
    h = swiglu(gate, up)  # [B, T, F]
    h = nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))
    return dense(h, down)  # BTF,FD->BTD
