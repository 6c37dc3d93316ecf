"""Paged decode attention on a mesh: the Pallas kernel (model/decode_kernel.py) run per shard under `shard_map`.

Legend: B batch, N query heads, K kv heads, H head dim, L layers, S cache slots per row.

As for splash (parallel/attention.py): a Pallas kernel is one opaque custom call that GSPMD cannot split, so
`use_mesh` installs `sharded_paged` and each device runs the kernel on its own rows (the axes of
"cache_batch") and kv heads (the axes of "kv_heads") of the page pool, with the query heads of those kv heads.
Each device's pool is a whole pool of its own (its rows' pages, numbered from 0), so the page indices are
local. The axes come from the rules table, as for the KV cache's own sharding (`program.kv_cache_sharding`),
so the kernel's shards are the cache's: no data moves.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
from jax.sharding import PartitionSpec as P

from llama_jax.model import decode_kernel
from llama_jax.parallel.sharding import DEFAULT_RULES, logical_to_spec


def _size(mesh, entry) -> int:
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(mesh.shape[a] for a in axes)


def sharded_paged(q, k, v, layer, lengths, *, interpret: bool, mesh, rules=DEFAULT_RULES):
    """q [B, N, H], pools k/v [K, L, B, S, H], layer, lengths [B] -> [B, N, H] float32 on `mesh`."""
    kv, _, batch, _, _ = k.shape
    rows, heads = logical_to_spec(("cache_batch", "kv_heads"), (batch, kv), mesh, rules=rules,
                                  where="paged decode attention")
    local = functools.partial(decode_kernel.local_paged, interpret=interpret)
    if _size(mesh, rows) * _size(mesh, heads) == 1:
        return local(q, k, v, layer, lengths)
    # query heads split as their kv heads do: a block of N/t query heads is the group of a block of K/t kv heads
    q_spec, pool_spec = P(rows, heads, None), P(heads, None, rows, None, None)
    run = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, pool_spec, pool_spec, P(), P(rows)), out_specs=q_spec,
                        check_vma=False)
    return run(q, k, v, layer, lengths)


@contextlib.contextmanager
def paged_on(mesh, rules=DEFAULT_RULES):
    """Within the block, the model's paged decode attention runs sharded over `mesh` (see `use_mesh`)."""
    with decode_kernel.sharded_by(functools.partial(sharded_paged, mesh=mesh, rules=rules)):
        yield
