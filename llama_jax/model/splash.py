"""Splash attention: the Pallas TPU kernel (jax.experimental.pallas.ops.tpu.splash_attention) for training and
prefill, where every query sits at its own key slot (no cache, or a cache filled from slot 0).

Legend: B batch, T query length, S key length (S = T here), N query heads, K kv heads, G = N/K, H head dim.

`Llama` asks `runs_splash` once per call; when it says yes, it hands the attention layers segment ids [B, T]
(int32: packed documents, or 0 for left padding and 1 for the prompt) in place of the boolean [B, T, S] mask,
and `model.attention.dot_product_attention` sends them here. The kernel builds the causal mask itself from
block indices (no [T, S] mask is ever formed) and handles GQA natively (query head n reads kv head n // G).

Off a TPU the kernel runs in Pallas interpret mode: the same kernel code, evaluated by XLA (slow; tests use
small shapes). On a mesh the kernel runs per shard under `shard_map`, which is the parallel wing's business:
`parallel/sharding.use_mesh` installs `parallel/attention.sharded_splash` with `sharded_by`, in the same
context that resolves the model's logical activation constraints, so the model never names a mesh axis.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import sys
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from llama_jax.config import LlamaConfig

# The kernel's tiles are multiples of the TPU's 128 lanes; a length that is not runs the XLA attention.
LANES = 128
# Block sizes tried largest first (each must divide the sequence); MaxText's sa_block_* default to 512.
BLOCKS = (512, 256, 128)

class KernelHook:
    """A per-context slot for a kernel's mesh wrapper: the parallel wing fills it (`set_to`, inside `use_mesh`)
    with the shard_map that runs the kernel on each device's shard; `get()` is None off a mesh."""

    def __init__(self, name: str):
        self._var: contextvars.ContextVar[Optional[Callable]] = contextvars.ContextVar(name, default=None)

    def get(self) -> Optional[Callable]:
        return self._var.get()

    @contextlib.contextmanager
    def set_to(self, fn: Optional[Callable]):
        token = self._var.set(fn)
        try:
            yield
        finally:
            self._var.reset(token)


# (q [B, N, T, H], k/v [B, K, S, H], segment_ids [B, T], interpret) -> [B, N, T, H] on the mesh in context;
# set by the parallel wing (see the module docstring), None off a mesh.
_SHARDED = KernelHook("llama_jax_splash_sharded")
sharded_by = _SHARDED.set_to  # within the block, splash attention runs through fn (the mesh's shard_map wrapper)


def target_platform() -> str:
    """The platform being compiled for: the mesh's devices (a TPU slice described on a CPU host, for `aot`),
    else the default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def runs_splash(config: LlamaConfig, length: int, from_zero: bool) -> bool:
    """Whether attention over `length` tokens runs the splash kernel: config.attention is "splash", or "auto"
    compiling for a TPU; the queries start at slot 0 (`from_zero`); and `length` is a multiple of LANES."""
    kind = config.attention
    if kind == "auto":
        kind = "splash" if target_platform() == "tpu" else "xla"
    if config.attention == "splash" and from_zero and length % LANES:
        warn_once(f"attention='splash': {length} tokens is not a multiple of {LANES}, the kernel's tile; this "
                   "attention runs XLA's (same numbers; pad the length to a multiple to run the kernel)")
    return kind == "splash" and from_zero and length % LANES == 0


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    """One line on stderr, once per message: a kernel asked for by name that cannot run as asked."""
    print(f"llama_jax: {message}", file=sys.stderr)


def _sa():
    """The Pallas kernel's module, imported on first use (Pallas' TPU modules add to every start-up)."""
    from jax.experimental.pallas.ops.tpu import splash_attention
    return splash_attention


def block_sizes(q_len: int, kv_len: int):
    """The kernel's tiles (a splash_attention.BlockSizes), forward and backward: the largest of BLOCKS dividing
    each length."""
    sa = _sa()
    bq = next(b for b in BLOCKS if q_len % b == 0)
    bkv = next(b for b in BLOCKS if kv_len % b == 0)
    return sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                         block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)


def make_kernel(num_heads: int, q_len: int, kv_len: int, *, interpret: bool, head_shards: int = 1,
                q_seq_shards: int = 1):
    """The causal splash kernel for one sequence: (q [N, T, H], k/v [K, S, H], SegmentIds) -> [N, T, H].
    `head_shards`/`q_seq_shards`: how many ways a mesh splits the heads / queries (see
    SplashAttentionKernel.manual_sharding_spec); the mask tables are built once for the whole [N, T, S]."""
    sa = _sa()
    mask = sa.MultiHeadMask([sa.CausalMask((q_len, kv_len))] * num_heads)
    blocks = block_sizes(q_len // q_seq_shards, kv_len)  # a query tile lies within one shard
    return sa.make_splash_mha(mask, block_sizes=blocks, head_shards=head_shards,
                              q_seq_shards=q_seq_shards, interpret=interpret)


def apply_kernel(kernel, q, k, v, q_segments, kv_segments):
    """kernel (make_kernel) over a batch: q [B, N, T, H], k/v [B, K, S, H], segment ids of the queries [B, T]
    and of the keys [B, S] -> [B, N, T, H]."""
    segments = _sa().SegmentIds(q=q_segments, kv=kv_segments)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s))(q, k, v, segments)


def local_splash(q, k, v, segment_ids, interpret: bool):
    """Splash attention on one device (or under GSPMD with no mesh in context). Shapes as apply_kernel."""
    kernel = make_kernel(q.shape[1], q.shape[2], k.shape[2], interpret=interpret)
    return apply_kernel(kernel, q, k, v, segment_ids, segment_ids)


def splash_attention(q, k, v, segment_ids) -> jnp.ndarray:
    """q [B, T, N, H], k [B, K, H, S], v [B, K, S, H] (the cache layouts, see attention.KVCache), segment_ids
    [B, T] int32 -> [B, T, N, H]: causal softmax(q k / sqrt(H)) v within each segment, in float32 inside the
    kernel. Queries and keys start at slot 0 and S == T."""
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    q = (q * scale).transpose(0, 2, 1, 3)  # [B, N, T, H]: the kernel does not scale
    k = k.transpose(0, 1, 3, 2)  # [B, K, S, H]: the kernel's logical layout (head dim minor)
    interpret = target_platform() != "tpu"
    sharded = _SHARDED.get()
    run = sharded if sharded is not None else local_splash
    out = run(q, k, v, segment_ids.astype(jnp.int32), interpret=interpret)  # [B, N, T, H]
    return out.transpose(0, 2, 1, 3)
