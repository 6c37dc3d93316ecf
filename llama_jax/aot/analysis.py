"""Compiling one program on abstract inputs and reading what it needs: per-device memory (`memory_analysis`),
XLA's FLOP count (`cost_analysis`), collectives and loops (`llama_jax.aot.hlo`); the analytic FLOPs XLA should
execute, and the check that tensor parallelism never gathers a whole weight."""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import tempfile
from typing import Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp

from llama_jax.aot import hlo
from llama_jax.config import LlamaConfig
from llama_jax.errors import DoesNotFit
from llama_jax.parallel.sharding import DEFAULT_RULES, split_axes


def abstract(shapes, shardings):
    """ShapeDtypeStruct leaves with shardings (a tree of shapes + a matching tree of shardings)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def abstract_bytes_per_device(tree) -> int:
    """Bytes one device holds of an abstract tree (the largest shard of each leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) else leaf.shape
        total += math.prod(shape) * jax.dtypes.itemsize_bits(leaf.dtype) // 8  # uint4 (NF4 codes): half a byte
    return total


@dataclasses.dataclass
class Compiled:
    """What one compiled program needs per device, and what it does."""

    name: str
    inputs: Dict[str, int]      # per-device bytes of each named input (params, opt_state, batch, cache...)
    argument: int               # memory_analysis: arguments (= sum of inputs, up to padding)
    output: int
    alias: int                  # outputs written into donated inputs
    temp: int                   # activations, gradients, workspaces
    code: int
    xla_flops: float            # cost_analysis per device (while bodies counted once)
    collectives: List[hlo.Collective]
    compile_s: float
    loops: List[Tuple[int, int, str]] = dataclasses.field(default_factory=list)  # hlo.while_loops
    optimal_seconds: float = 0.0  # cost_analysis: XLA's run-time estimate (while bodies counted once; <= 0: none)
    bytes_accessed: float = 0.0   # cost_analysis: HBM bytes read and written (while bodies counted once)

    @property
    def total(self) -> int:
        """Peak bytes per device: live inputs + fresh outputs + temporaries + code."""
        return self.argument + self.output - self.alias + self.temp + self.code


def compile_and_analyze(name: str, fn, args: Sequence, inputs: Dict[str, int], mesh) -> Compiled:
    """Lower `fn` (a jax.jit or anything with .lower) on abstract `args`, compile for the mesh's devices."""
    import time

    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    # The optimized HLO comes from XLA's own dump: compiled.as_text() re-parses a proto, which fails on some
    # big TPU programs ("async-update instruction should have 1 operands").
    with tempfile.TemporaryDirectory() as dump:
        try:
            compiled = lowered.compile(compiler_options={"xla_dump_to": dump, "xla_dump_hlo_as_text": True})
        except Exception as e:  # XLA's compile-time HBM check: "RESOURCE_EXHAUSTED ... Ran out of memory"
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            raise DoesNotFit(name, inputs, str(e).split("\n")[0]) from None
        files = glob.glob(os.path.join(dump, "*.after_optimizations.txt"))
        if files:
            with open(max(files, key=os.path.getsize)) as f:
                text = f.read()
        else:
            text = compiled.as_text()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return Compiled(name, inputs, mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                    mem.temp_size_in_bytes, mem.generated_code_size_in_bytes, float(cost.get("flops", 0.0)),
                    hlo.collectives(text, dict(mesh.shape)), seconds, hlo.while_loops(text),
                    float(cost.get("optimal_seconds", 0.0) or 0.0), float(cost.get("bytes accessed", 0.0) or 0.0))


def hardware_flops_per_token(config: LlamaConfig, seq_len: int, train: bool = True) -> float:
    """FLOPs XLA actually executes per token: matmuls (6N train / 2N forward), attention over all seq_len keys
    (the causal mask is applied to a full QK^T), and the forward of the blocks again under full remat."""
    from llama_jax.model import spec
    from llama_jax.model.flops import matmul_params, param_count

    layer_params = param_count(config, [p.name for p in spec.params(config) if p.stacked and p.inputs])
    attn_fwd = 4 * config.num_layers * config.num_heads * config.head_dim * seq_len  # QK^T and PV
    if not train:
        return 2.0 * matmul_params(config) + attn_fwd
    flops = 6.0 * matmul_params(config) + 3 * attn_fwd
    if config.remat == "full":
        flops += 2.0 * layer_params + attn_fwd
    elif config.remat == "dots_no_batch":
        flops += attn_fwd  # attention's batched dots are recomputed
    elif config.remat == "save_qkv_proj":  # everything but the q/k/v projections is recomputed
        qkv = param_count(config, ["layers/attn/q", "layers/attn/k", "layers/attn/v"])
        flops += 2.0 * (layer_params - qkv) + attn_fwd
    return flops



def weight_gathers_over_tensor(colls: Sequence[hlo.Collective], config: LlamaConfig,
                               mesh_shape: Dict[str, int], rules=DEFAULT_RULES) -> List[Tuple[str, hlo.Collective]]:
    """All-gathers over a tensor-parallel mesh axis (one that splits "heads" under `rules`) whose result is a
    whole weight matrix along its tensor-split dimension (one layer's slice, possibly still split over its
    other mesh axes, e.g. the fsdp one): what tensor parallelism must never do. Returns [(parameter path,
    collective)]."""
    from llama_jax.model.transformer import logical_axes, param_shapes

    tensor = set(split_axes("heads", mesh_shape, rules))
    if not tensor:
        return []
    candidates = []  # (name, sorted dims > 1)
    shapes, axes = param_shapes(config), logical_axes(config)
    for (path, leaf), (_, names) in zip(jax.tree_util.tree_flatten_with_path(shapes)[0],
                                         jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(
                                             x, jax.sharding.PartitionSpec))[0]):
        dims, names = list(leaf.shape), list(names)
        over = [set(split_axes(n, mesh_shape, rules)) if n else set() for n in names]
        if not any(o & tensor for o in over) or len(dims) < 2:
            continue
        if names[0] == "layers":
            dims, over = dims[1:], over[1:]
        others = [math.prod(mesh_shape[a] for a in o - tensor) for o in over]  # e.g. the fsdp split
        split = [d // k if d % k == 0 else d for d, k in zip(dims, others)]
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        for variant in {tuple(dims), tuple(split)}:
            candidates.append((name, tuple(sorted(d for d in variant if d > 1))))
    out = []
    for c in colls:
        if c.kind != "all-gather" or not tensor & set(c.axes):
            continue
        got = [tuple(sorted(d for d in dims if d > 1)) for _, dims in hlo.array_shapes(c.shape)]
        for name, dims in candidates:
            if dims in got:
                out.append((name, c))
                break
    return out
