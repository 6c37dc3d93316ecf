"""Ahead-of-time compilation for TPU slices, on a machine without a TPU.

With the `libtpu` wheel installed, `jax.experimental.topologies` describes a TPU slice (e.g. "v5p:4x4x4", 64
chips) on a CPU host, and a function jitted with shardings over a Mesh of those devices compiles with the real
TPU compiler. Nothing is allocated: every input is a `jax.ShapeDtypeStruct` carrying its sharding. From the
compiled program we read the per-chip memory (`memory_analysis`), XLA's FLOP count (`cost_analysis`) and the
collectives (`llama_jax.aot.hlo`).

    python train.py --config configs/llama3.1-8b.py --aot v5p:2x4x4      # the real train step
    python sample.py --checkpoint-config llama3.1-8b --aot v5e:2x4       # prefill + one decode step
    python -m llama_jax.aot train --config configs/NAME.py --topology v5p:4x4x4

Notes on the numbers. Memory is per device (one chip; v4's topology lists each TensorCore as a device, so
there a device has half a chip's HBM). XLA's cost analysis counts a while-loop body once, so for a scanned
layer stack it is the cost of a one-layer model (and of one gradient-accumulation micro-batch); the report
compares it with the analytic count of exactly that and gives the analytic step FLOPs (the MFU numerator).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import math
import os
import re
import sys
import tempfile
from typing import Any, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.aot import hlo
from llama_jax.config import LlamaConfig
from llama_jax.errors import AotError, DoesNotFit  # noqa: F401 (also re-exported)

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_gib: float          # per chip
    peak_flops: float       # dense bf16 FLOP/s per chip
    examples: Tuple[str, ...]


# HBM and peak bf16 FLOP/s per chip from Google Cloud's TPU system-architecture pages.
CHIPS = {
    "v4": Chip(32, 275e12, ("v4:2x2x1", "v4:2x2x2", "v4:2x2x4", "v4:4x4x4", "v4:4x4x8", "v4:8x8x8")),
    "v5e": Chip(16, 197e12, ("v5e:1x1", "v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:4x8", "v5e:8x8", "v5e:8x16",
                             "v5e:16x16")),
    "v5p": Chip(95, 459e12, ("v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4", "v5p:2x4x4", "v5p:4x4x4", "v5p:4x4x8",
                             "v5p:4x8x8", "v5p:8x8x8", "v5p:8x8x16")),
    "v6e": Chip(32, 918e12, ("v6e:1x1", "v6e:2x2", "v6e:2x4", "v6e:4x4", "v6e:4x8", "v6e:8x8", "v6e:8x16",
                             "v6e:16x16")),
}


def valid_topologies() -> str:
    return "; ".join(f"{g}: {', '.join(c.examples)}" for g, c in CHIPS.items())


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice: its `devices` (TpuDevice objects usable in a Mesh, not attached to anything), chips, and
    per-device HBM bytes and peak FLOP/s."""

    name: str
    generation: str
    chips: int
    devices: Tuple[Any, ...]

    @property
    def devices_per_chip(self) -> int:
        return max(len(self.devices) // self.chips, 1)

    @property
    def hbm_bytes(self) -> int:
        return int(CHIPS[self.generation].hbm_gib * GIB / self.devices_per_chip)

    @property
    def peak_flops(self) -> float:
        return CHIPS[self.generation].peak_flops / self.devices_per_chip


def get_topology(name: str) -> Topology:
    """The TPU slice `name` ("v5e:2x2", "v5p:4x4x4", ...), described by libtpu without a TPU."""
    m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})", name.strip())
    if not m:
        raise AotError(f"unknown TPU topology {name!r}: expected GENERATION:AxB[xC] with GENERATION one of "
                       f"{', '.join(CHIPS)}; valid choices include {valid_topologies()}")
    # libtpu takes /tmp/libtpu_lockfile on load; any other jax process that probed for a TPU (a CPU run
    # without JAX_PLATFORMS=cpu) holds it. We only compile, so sharing is safe.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # Without a TPU VM's metadata libtpu logs an INVALID_ARGUMENT about its worker list; this process only
    # compiles, so name itself as the one worker.
    if os.environ.get("TPU_WORKER_HOSTNAMES", "WARNING").startswith("WARNING"):
        os.environ["TPU_WORKER_HOSTNAMES"] = "localhost"
    if importlib.util.find_spec("libtpu") is None:
        raise AotError(f"compiling for {name!r} needs the TPU compiler: pip install libtpu==0.0.52 (the build "
                       "that pairs with jax 0.10.2; see requirements-test.txt). No TPU is needed.")
    try:
        from jax.experimental import topologies
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name.strip())
    except Exception as e:  # a shape libtpu rejects
        msg = str(e).split("\n")[0]
        raise AotError(f"TPU topology {name!r} is not available: {msg}; valid choices include "
                       f"{valid_topologies()}") from None
    chips = math.prod(int(d) for d in m.group(2).split("x"))
    return Topology(name.strip(), m.group(1), chips, tuple(desc.devices))


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def topology_mesh(topology: Topology, data: int = 1, fsdp: int = -1, tensor: int = 1):
    """A (data, fsdp, tensor) Mesh over the slice's devices, laid out on the physical torus (tensor
    innermost); one size may be -1. A mesh that does not cover the slice exactly is an AotError."""
    from llama_jax.parallel.sharding import MESH_AXES

    n = len(topology.devices)
    sizes = [data, fsdp, tensor]
    known = math.prod(s for s in sizes if s != -1)
    bad = (sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes) or n % known
           or (-1 not in sizes and known != n))
    if bad:
        choices = ", ".join(f"(data=1, fsdp={n // t}, tensor={t})" for t in _divisors(n) if t <= 16)
        raise AotError(f"mesh data={data} × fsdp={fsdp} × tensor={tensor} does not divide the {n} devices of "
                       f"{topology.name}: the product must be {n} (one size may be -1); valid sizes are the "
                       f"divisors of {n}: {_divisors(n)}, e.g. {choices}")
    sizes = [n // known if s == -1 else s for s in sizes]
    auto = (jax.sharding.AxisType.Auto,) * 3
    try:
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=list(topology.devices))
    except Exception:  # a shape the physical-layout helper does not know: plain row-major order
        from jax.sharding import Mesh
        return Mesh(np.asarray(topology.devices).reshape(sizes), MESH_AXES, axis_types=auto)


# ------------------------------------------------------------------------------------------ analysis
def abstract(shapes, shardings):
    """ShapeDtypeStruct leaves with shardings (a tree of shapes + a matching tree of shardings)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def device_bytes(tree) -> int:
    """Bytes one device holds of an abstract tree (the largest shard of each leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
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
                    hlo.collectives(text, dict(mesh.shape)), seconds, hlo.while_loops(text))


def hardware_flops_per_token(config: LlamaConfig, seq_len: int, train: bool = True) -> float:
    """FLOPs XLA actually executes per token: matmuls (6N train / 2N forward), attention over all seq_len keys
    (the causal mask is applied to a full QK^T), and the forward of the blocks again under full remat."""
    from llama_jax.model.flops import matmul_params

    head = config.hidden_size * config.vocab_size
    layer_params = matmul_params(config) - head
    attn_fwd = 4 * config.num_layers * config.num_heads * config.head_dim * seq_len  # QK^T and PV
    if not train:
        return 2.0 * matmul_params(config) + attn_fwd
    flops = 6.0 * matmul_params(config) + 3 * attn_fwd
    if config.remat == "full":
        flops += 2.0 * layer_params + attn_fwd
    elif config.remat == "dots_no_batch":
        flops += attn_fwd  # attention's batched dots are recomputed
    elif config.remat == "save_qkv_proj":  # everything but the q/k/v projections is recomputed
        d, h = config.hidden_size, config.head_dim
        qkv = config.num_layers * d * h * (config.num_heads + 2 * config.num_kv_heads)
        flops += 2.0 * (layer_params - qkv) + attn_fwd
    return flops



def weight_gathers_over_tensor(colls: Sequence[hlo.Collective], config: LlamaConfig,
                               mesh_shape: Dict[str, int]) -> List[Tuple[str, hlo.Collective]]:
    """All-gathers over a mesh-axis set that includes `tensor` whose result is a whole weight matrix along its
    tensor-split dimension (one layer's slice, possibly still split over fsdp): what tensor parallelism must
    never do. Returns [(parameter path, collective)]."""
    from llama_jax.model.transformer import logical_axes, param_shapes
    from llama_jax.parallel.sharding import DEFAULT_RULES

    if mesh_shape.get("tensor", 1) == 1:
        return []
    rules, fsdp = dict(DEFAULT_RULES), mesh_shape.get("fsdp", 1)
    candidates = []  # (name, sorted dims > 1)
    shapes, axes = param_shapes(config), logical_axes(config)
    for (path, leaf), (_, names) in zip(jax.tree_util.tree_flatten_with_path(shapes)[0],
                                         jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(
                                             x, jax.sharding.PartitionSpec))[0]):
        dims, names = list(leaf.shape), list(names)
        if not any(rules.get(n) == "tensor" for n in names if n) or len(dims) < 2:
            continue
        if names[0] == "layers":
            dims, names = dims[1:], names[1:]
        split = [d // fsdp if rules.get(n) == "fsdp" and d % fsdp == 0 else d for d, n in zip(dims, names)]
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        for variant in {tuple(dims), tuple(split)}:
            candidates.append((name, tuple(sorted(d for d in variant if d > 1))))
    out = []
    for c in colls:
        if c.kind != "all-gather" or "tensor" not in c.axes:
            continue
        got = [tuple(sorted(d for d in dims if d > 1)) for _, dims in hlo.array_shapes(c.shape)]
        for name, dims in candidates:
            if dims in got:
                out.append((name, c))
                break
    return out

# ------------------------------------------------------------------------------------------ training
@dataclasses.dataclass
class TrainReport:
    """The compiled train step of a recipe on a slice, and the numbers that decide whether it fits."""

    recipe: str
    topology: Topology
    mesh_shape: Dict[str, int]
    config: LlamaConfig
    batch_size: int
    seq_len: int
    grad_accum: int
    compiled: Compiled
    flops_per_step: float         # analytic model FLOPs (train_flops_per_token x tokens): the MFU numerator
    xla_check: Tuple[float, float]  # (XLA cost per device x devices, analytic hardware FLOPs of the same program)

    @property
    def fits(self) -> bool:
        return self.compiled.total <= self.topology.hbm_bytes

    @property
    def headroom(self) -> float:
        return 1.0 - self.compiled.total / self.topology.hbm_bytes

    def step_time(self, mfu: float) -> float:
        """Seconds per step at model-FLOPs utilisation `mfu`."""
        return self.flops_per_step / (mfu * self.topology.peak_flops * len(self.topology.devices))


def _abstract_batch(batch_size: int, seq_len: int, sharding) -> dict:
    """The trainer's batch (llama_jax.training.data rows): inputs, targets, segment_ids, positions, loss_mask."""
    ints = {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=sharding)
            for k in ("inputs", "targets", "segment_ids", "positions")}
    return dict(ints, loss_mask=jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32, sharding=sharding))


def compile_train(run_config, topology: str, recipe: str = "") -> TrainReport:
    """Compile the train step of `run_config` (a RunConfig) for the TPU slice `topology`: the same optimizer,
    shardings, remat, scan, gradient accumulation, LoRA and donation as `trainer.train`, built by the same
    functions, on abstract inputs."""
    from llama_jax.model import flops as flops_lib
    from llama_jax.training import step as ts
    from llama_jax.training import loop as trainer
    from llama_jax.parallel.sharding import DEFAULT_RULES, MeshError, batch_sharding

    cfg = run_config
    topo = get_topology(topology)
    mesh = topology_mesh(topo, cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    config = trainer.model_config(cfg)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if (cfg.batch_size // cfg.grad_accum) % shards:
        raise AotError(f"batch_size={cfg.batch_size} / grad_accum={cfg.grad_accum} cannot be split over mesh "
                       f"data×fsdp = {shards} devices of {topo.name}; use a multiple of {shards * cfg.grad_accum}")
    schedule = ts.make_schedule(cfg.optim.lr, cfg.optim.warmup_steps, cfg.steps, cfg.optim.min_lr_ratio)
    optimizer = ts.make_optimizer(schedule, weight_decay=cfg.optim.weight_decay, b1=cfg.optim.b1, b2=cfg.optim.b2,
                                  eps=cfg.optim.eps, clip_norm=cfg.optim.clip_norm)
    setup = trainer.Setup(cfg, config, "", {}, mesh, None)
    try:
        model = trainer.Model(setup, optimizer)
    except MeshError as e:
        raise AotError(f"{recipe or 'config'} does not fit mesh {dict(mesh.shape)}: {e}") from None
    sh = model.state_shardings
    frozen = None
    if model.lora:
        from llama_jax.model.transformer import param_shapes
        frozen = abstract(param_shapes(config), sh.frozen)
    state = ts.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=sh.step),
                          params=abstract(model.shapes, sh.params),
                          opt_state=abstract(jax.eval_shape(optimizer.init, model.shapes), sh.opt_state),
                          frozen=frozen)
    batch = _abstract_batch(cfg.batch_size, cfg.seq_len, batch_sharding(mesh, DEFAULT_RULES))
    step_fn = ts.make_train_step(config, optimizer, mesh, shardings=sh, schedule=schedule,
                                 accum_steps=cfg.grad_accum, combine=model.combine)
    inputs = {"params": device_bytes(state.params), "opt_state": device_bytes(state.opt_state),
              "batch": device_bytes(batch)}
    if frozen is not None:
        inputs["frozen"] = device_bytes(frozen)
    compiled = compile_and_analyze("train_step", step_fn, (state, batch), inputs, mesh)

    tokens = cfg.batch_size * cfg.seq_len
    flops_per_step = flops_lib.train_flops_per_token(config, cfg.seq_len) * tokens
    # XLA counts the layer scan (and the accumulation scan) once: compare with one layer, one micro-batch.
    one = config.replace(num_layers=1)
    expected = hardware_flops_per_token(one, cfg.seq_len) * tokens / cfg.grad_accum
    check = (compiled.xla_flops * len(topo.devices), expected)
    return TrainReport(recipe, topo, dict(mesh.shape), config, cfg.batch_size, cfg.seq_len, cfg.grad_accum,
                       compiled, flops_per_step, check)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB / 4 else f"{n / 2**20:.1f} MiB"


def format_collectives(colls: Sequence[hlo.Collective], limit: int = 8) -> List[str]:
    lines = []
    for kind, axes, count, nbytes in hlo.summarize(colls)[:limit]:
        lines.append(f"    {kind:<18} over {'×'.join(axes) or '-':<12} {count:>6}x per step  "
                     f"{nbytes / 2**20:10.1f} MiB per device")
    return lines


def _per_device(inputs: Dict[str, int]) -> str:
    """"  per device: params 1.2 GiB, ..." for the named inputs' per-device bytes."""
    return "  per device: " + ", ".join(f"{k} {_gib(v)}" for k, v in inputs.items())


def format_compiled(c: Compiled, hbm: int) -> List[str]:
    return [_per_device(c.inputs),
            f"    temporaries (activations, gradients, workspace) {_gib(c.temp)}, new outputs "
            f"{_gib(c.output - c.alias)}, code {_gib(c.code)}",
            f"    total {_gib(c.total)} of {_gib(hbm)} HBM  ->  {'FITS' if c.total <= hbm else 'DOES NOT FIT'}, "
            f"headroom {100 * (1 - c.total / hbm):.0f}%   (compiled in {c.compile_s:.0f}s)",
            "  collectives (from the compiled HLO):"] + format_collectives(c.collectives)


_TRAIN_HINT = "more grad_accum (fewer sequences per micro-batch), model.remat=full, a larger mesh.tensor, a bigger slice"
_SAMPLE_HINT = "a smaller --batch or --context (the prefill's scores are batch x heads x prompt x context x 4 " \
               "bytes), --int8, or more chips"


def format_does_not_fit(e: DoesNotFit, what: str, topology: str, hint: str = _TRAIN_HINT) -> str:
    return (f"AOT {e.name}: {what} on {topology} DOES NOT FIT: the TPU compiler ran out of HBM.\n"
            f"{_per_device(e.inputs)}\n  XLA: {e}\n  try: {hint}")


def format_train(r: TrainReport) -> str:
    xla, expected = r.xla_check
    lines = [f"AOT train step: {r.recipe or r.config.name} ({r.config.name}, {r.config.num_params() / 1e9:.2f}B params, "
             f"remat={r.config.remat}, {r.config.dtype}/{r.config.param_dtype}) on {r.topology.name} "
             f"({r.topology.chips} chips, {len(r.topology.devices)} devices)",
             f"  mesh {r.mesh_shape}, batch {r.batch_size} x {r.seq_len} tokens, grad_accum {r.grad_accum}"]
    lines += format_compiled(r.compiled, r.topology.hbm_bytes)
    def at(mfu):
        t = r.step_time(mfu)
        return (f"{f'{t:.2f} s' if t >= 1 else f'{t * 1e3:.2f} ms'} "
                f"({r.batch_size * r.seq_len / t / len(r.topology.devices):,.0f} tokens/s per device)")

    lines += [f"  FLOPs per step (analytic, for MFU): {r.flops_per_step:.3e}; a step takes {at(0.4)} at 40% MFU, "
              f"{at(0.6)} at 60%",
              f"  XLA cost analysis (each loop body once): {xla:.3e} vs analytic {expected:.3e} for one layer "
              f"and one micro-batch ({100 * (xla / expected - 1):+.1f}%)"]
    gathers = weight_gathers_over_tensor(r.compiled.collectives, r.config, r.mesh_shape)
    if r.mesh_shape.get("tensor", 1) > 1:
        names = sorted({name for name, _ in gathers})
        lines.append("  tensor parallelism: whole-weight all-gathers over tensor: " + (
            ", ".join(names) + (" (the embedding lookup's table)" if names == ["embed/embedding"] else "")
            if names else "none"))
    own = [t for t, _, op in r.compiled.loops if "while" not in op.split("/")[-1] and t > 1]
    trips = sorted({t for t, _, _ in r.compiled.loops if t > 1})
    lines.append(f"  while loops (trip counts): {trips or 'none'}" + (
        f"; {len(own)} made by XLA itself (windowed matmuls), whose bodies cost analysis also counts once: "
        "the comparison above then undercounts" if own else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ sampling
@dataclasses.dataclass
class SampleReport:
    """Prefill of `prompt` tokens and one decode step, batch `batch`, KV cache of `context` slots."""

    model: str
    topology: Topology
    mesh_shape: Dict[str, int]
    batch: int
    prompt: int
    context: int
    int8: bool
    prefill: Any                # Compiled, or DoesNotFit when the TPU compiler refused it
    decode: Any

    @property
    def fits(self) -> bool:
        return all(isinstance(c, Compiled) and c.total <= self.topology.hbm_bytes
                   for c in (self.prefill, self.decode))


def compile_sample(name: str, topology: str, *, batch: int = 1, context: int = 8192, prompt: int = 0,
                   int8: bool = False, tensor: int = -1) -> SampleReport:
    """Compile the sampler's two model calls (llama_jax.sampling.sampler._generate): the prefill of a `prompt`-token
    batch into an empty `context`-slot KV cache, and one decode step, with bf16 (or int8) weights split over
    a (1, 1, tensor) mesh, the cache split over batch and KV heads, and the cache donated."""
    from llama_jax.model import quantize
    from llama_jax.model.transformer import CACHE_AXES, Llama, init_cache, param_shapes
    from llama_jax.parallel.sharding import MeshError, logical_to_spec, param_shardings, use_mesh
    from jax.sharding import NamedSharding

    topo = get_topology(topology)
    try:
        if os.path.isfile(os.path.join(name, "config.json")):  # a Hugging Face / llama_jax directory
            config = LlamaConfig.from_hf(os.path.join(name, "config.json"))
            config = config.replace(dtype="bfloat16", param_dtype="bfloat16")
        else:
            config = LlamaConfig.from_preset(name, dtype="bfloat16", param_dtype="bfloat16")
    except Exception as e:
        raise AotError(f"--checkpoint-config {name!r}: {e}") from None
    n = len(topo.devices)
    tensor = n if tensor == -1 else tensor
    mesh = topology_mesh(topo, 1, -1, tensor)
    prompt = prompt or context // 4
    try:
        shardings = param_shardings(config, mesh)
    except MeshError as e:
        raise AotError(f"{name} does not fit mesh {dict(mesh.shape)}: {e}") from None
    params = abstract(param_shapes(config), shardings)
    if int8:
        shapes = jax.eval_shape(lambda p: quantize.quantize_params(p), param_shapes(config))
        params = abstract(shapes, quantize.quantized_shardings(shardings))
    cache_shape = jax.eval_shape(lambda: init_cache(config, batch, context))
    cache_sharding = {n: NamedSharding(mesh, logical_to_spec(CACHE_AXES[n], cache_shape[n].shape, mesh))
                      for n in cache_shape}
    cache = abstract(cache_shape, cache_sharding)
    rows = NamedSharding(mesh, logical_to_spec(("batch", "length"), (batch, 1), mesh))
    model = Llama(config)

    def prefill(params, tokens, lengths, cache):  # tokens [B, P] left-padded, lengths [B]
        plen = tokens.shape[1]
        pad = plen - lengths
        positions = jnp.maximum(jnp.arange(plen)[None, :] - pad[:, None], 0)
        kv_mask = jnp.arange(context)[None, :] >= pad[:, None]
        return model.apply({"params": params}, tokens, positions=positions, cache=cache, cache_index=0,
                           kv_mask=kv_mask, logits_at=jnp.full((tokens.shape[0],), plen - 1))

    def decode(params, token, lengths, cache, step):  # token [B], one new token per row
        kv_mask = jnp.arange(context)[None, :] >= (prompt - lengths)[:, None]
        return model.apply({"params": params}, token[:, None], positions=(lengths + step - 1)[:, None],
                           cache=cache, cache_index=prompt + step - 1, kv_mask=kv_mask)

    tokens = jax.ShapeDtypeStruct((batch, prompt), jnp.int32, sharding=rows)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=NamedSharding(mesh, jax.sharding.PartitionSpec(*rows.spec[:1])))
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, jax.sharding.PartitionSpec()))
    out = (NamedSharding(mesh, logical_to_spec(("batch", "length", "act_vocab"), (batch, 1, config.vocab_size),
                                               mesh)), cache_sharding)

    class InMesh:  # lower inside the mesh context, as sampling does (the model's logical constraints)
        def __init__(self, fn, donate):
            self.fn = jax.jit(fn, out_shardings=out, donate_argnums=donate)

        def lower(self, *args):
            with use_mesh(mesh):
                return self.fn.lower(*args)

    inputs = {"params": device_bytes(params), "kv_cache": device_bytes(cache)}
    token = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=lengths.sharding)
    programs = {"prefill": (prefill, (params, tokens, lengths, cache)),
                "decode": (decode, (params, token, lengths, cache, step))}
    done = {}
    for key, (fn, args) in programs.items():
        try:
            done[key] = compile_and_analyze(key, InMesh(fn, (3,)), args, inputs, mesh)
        except DoesNotFit as e:  # report both programs either way
            done[key] = e
    pre, dec = done["prefill"], done["decode"]
    return SampleReport(name, topo, dict(mesh.shape), batch, prompt, context, int8, pre, dec)


def format_sample(r: SampleReport) -> str:
    lines = [f"AOT sampling: {r.model}{' int8' if r.int8 else ' bf16'} on {r.topology.name} ({r.topology.chips} chips), "
             f"mesh {r.mesh_shape}, batch {r.batch}, prompt {r.prompt}, KV cache {r.context} slots"]
    for c in (r.prefill, r.decode):
        lines.append(f" {c.name}:")
        if isinstance(c, DoesNotFit):
            lines += [_per_device(c.inputs), f"    DOES NOT FIT: {c}", f"    try: {_SAMPLE_HINT}"]
            continue
        lines += format_compiled(c, r.topology.hbm_bytes)[:3]
        lines.append(f"    XLA FLOPs per device (layer loop once): {c.xla_flops:.3e}")
    return "\n".join(lines)


def sample_cli(name: str, topology: str, **kw) -> int:
    """`sample.py --aot TOPOLOGY`: exit status 0 if prefill and decode fit, 1 if not, 2 on bad input."""
    cpu_host()
    try:
        report = compile_sample(name, topology, **kw)
    except AotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_sample(report))
    return 0 if report.fits else 1


# ------------------------------------------------------------------------------------------ command line
def cpu_host():
    """Compile-only runs need no accelerator: keep jax on the CPU (skips libtpu's TPU probe and its lock)."""
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")


def train_cli(run_config, topology: str, recipe: str = "") -> int:
    """`train.py --aot TOPOLOGY`: print the report; exit status 0 if it fits, 1 if not, 2 on bad input."""
    cpu_host()
    try:
        report = compile_train(run_config, topology, recipe)
    except AotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DoesNotFit as e:
        print(format_does_not_fit(e, recipe or "train step", topology))
        return 1
    print(format_train(report))
    return 0 if report.fits else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Compile train/sample steps for a TPU slice without a TPU.")
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train", help="the train step of a recipe")
    t.add_argument("--config", default="", help="a recipe file, e.g. configs/llama3.1-8b.py")
    t.add_argument("--topology", required=True, help=f"e.g. v5p:4x4x4 ({valid_topologies()})")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. mesh.tensor=4")
    s = sub.add_parser("sample", help="prefill + one decode step")
    s.add_argument("--checkpoint-config", required=True, help="a preset name, e.g. llama3.1-8b")
    s.add_argument("--topology", required=True)
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--context", type=int, default=8192, help="KV cache length (prompt + new tokens)")
    s.add_argument("--prompt", type=int, default=0, help="prefill length (default: context / 4)")
    s.add_argument("--int8", action="store_true", help="int8 weights (llama_jax.model.quantize)")
    s.add_argument("--tensor", type=int, default=-1, help="tensor-parallel size (default: all devices)")
    args = parser.parse_args(argv)
    if args.what == "train":
        from llama_jax.training import run_config
        try:
            cfg = run_config.build(args.config, args.overrides)
        except run_config.RunConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return train_cli(cfg, args.topology, args.config)
    return sample_cli(args.checkpoint_config, args.topology, batch=args.batch, context=args.context,
                      prompt=args.prompt, int8=args.int8, tensor=args.tensor)


if __name__ == "__main__":
    sys.exit(main())
