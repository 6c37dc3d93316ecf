"""Splash attention on a mesh: the Pallas kernel (model/splash.py) run per shard under `shard_map`.

Legend: B batch, T query length, S key length, N query heads, K kv heads, G = N/K, H head dim.

A Pallas kernel is one opaque custom call: GSPMD cannot split it, and left to itself would gather every
input onto each device. So `use_mesh` installs `sharded_splash` (through `model.splash.sharded_by`, in the
same context as the logical-axis rules) and the kernel runs on each device's shard: rows over the batch axes,
heads over the axes of "act_heads", queries over the axes of "length" (none under DEFAULT_RULES); keys and
values stay whole along S, since each query block may read any earlier key. Which mesh axes those are comes
from the rules table, so this file, like the model, names no mesh axis.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from llama_jax.model import splash
from llama_jax.parallel.sharding import DEFAULT_RULES, logical_to_spec


def _axes(entry) -> tuple:
    """The mesh axes of a PartitionSpec entry (None, an axis, or a tuple of axes)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _size(mesh, entry) -> int:
    """Devices a PartitionSpec entry splits over."""
    return math.prod(mesh.shape[a] for a in _axes(entry))


def kv_repeats(num_heads: int, num_kv_heads: int, head_shards: int) -> int:
    """How many times to repeat each kv head so that the kv heads split over `head_shards` devices as the
    query heads do (each device's query heads then read only its own kv heads): the smallest divisor r of
    G = N/K with K*r a multiple of head_shards (1 when K already divides)."""
    groups = num_heads // num_kv_heads
    return next(r for r in range(1, groups + 1) if groups % r == 0 and (num_kv_heads * r) % head_shards == 0)


def sharded_splash(q, k, v, segment_ids, *, interpret: bool, mesh, rules=DEFAULT_RULES):
    """q [B, N, T, H], k/v [B, K, S, H], segment_ids [B, T] (S == T) -> [B, N, T, H] on `mesh`."""
    b, n, t, _ = q.shape
    spec = functools.partial(logical_to_spec, mesh=mesh, rules=rules, where="splash attention")
    batch, heads, seq = spec(("batch", "act_heads", "length"), (b, n, t))
    taken = set(_axes(batch)) | set(_axes(heads))
    # each shard's queries must still fill whole 128-lane tiles, on axes the batch and heads leave free
    if (t // _size(mesh, seq)) % splash.LANES or taken & set(_axes(seq)):
        seq = None
    head_shards, seq_shards = _size(mesh, heads), _size(mesh, seq)
    if _size(mesh, batch) * head_shards * seq_shards == 1:
        return splash.local_splash(q, k, v, segment_ids, interpret=interpret)
    repeats = kv_repeats(n, k.shape[1], head_shards)
    if repeats > 1:  # e.g. 8 kv heads on a tensor axis of 16: each device needs its group's kv head
        k, v = (x.repeat(repeats, axis=1) for x in (k, v))
    kernel = splash.make_kernel(n, t, k.shape[2], interpret=interpret, head_shards=head_shards,
                                q_seq_shards=seq_shards)
    kernel_spec = kernel.manual_sharding_spec(NamedSharding(mesh, P(heads, seq)))
    q_spec, kv_spec = P(batch, heads, seq, None), P(batch, heads, None, None)
    run = jax.shard_map(splash.apply_kernel, mesh=mesh, out_specs=q_spec, check_vma=False,
                        in_specs=(kernel_spec, q_spec, kv_spec, kv_spec, P(batch, seq), P(batch, None)))
    return run(kernel, q, k, v, segment_ids, segment_ids)


@contextlib.contextmanager
def splash_on(mesh, rules=DEFAULT_RULES):
    """Within the block, the model's splash attention runs sharded over `mesh` (see `use_mesh`)."""
    with splash.sharded_by(functools.partial(sharded_splash, mesh=mesh, rules=rules)):
        yield
