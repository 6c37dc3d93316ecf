"""The text of the AOT reports: per-device memory, collectives, FLOPs and the verdict."""

from __future__ import annotations

from typing import Dict, List, Sequence

from llama_jax.aot import hlo
from llama_jax.aot.analysis import Compiled, weight_gathers_over_tensor
from llama_jax.aot.sample_report import SampleReport
from llama_jax.aot.topology import GIB
from llama_jax.aot.train_report import TrainReport
from llama_jax.errors import DoesNotFit
from llama_jax.model.flops import num_params
from llama_jax.parallel.sharding import split_axes


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
    lines = [f"AOT train step: {r.recipe or r.config.name} ({r.config.name}, {num_params(r.config) / 1e9:.2f}B params, "
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
              f"and one micro-batch ({100 * (xla / expected - 1):+.1f}%)" if expected == expected else
              f"  XLA cost analysis (each loop body once): {xla:.3e} (no one-layer comparison: this model's layers "
              "are several loops and unrolled cross-attention layers)"]
    gathers = weight_gathers_over_tensor(r.compiled.collectives, r.config, r.mesh_shape)
    tensor = split_axes("heads", r.mesh_shape)  # the tensor-parallel mesh axes
    if tensor:
        names = sorted({name for name, _ in gathers})
        lines.append(f"  tensor parallelism: whole-weight all-gathers over {'×'.join(tensor)}: " + (
            ", ".join(names) + (" (the embedding lookup's table)" if names == ["embed/embedding"] else "")
            if names else "none"))
    own = [t for t, _, op in r.compiled.loops if "while" not in op.split("/")[-1] and t > 1]
    trips = sorted({t for t, _, _ in r.compiled.loops if t > 1})
    lines.append(f"  while loops (trip counts): {trips or 'none'}" + (
        f"; {len(own)} made by XLA itself (windowed matmuls), whose bodies cost analysis also counts once: "
        "the comparison above then undercounts" if own else ""))
    return "\n".join(lines)


def format_sample(r: SampleReport) -> str:
    lines = [f"AOT sampling: {r.model}{' int8' if r.int8 else ' bf16'} on {r.topology.name} ({r.topology.chips} chips), "
             f"mesh {r.mesh_shape}, batch {r.batch}, prompt {r.prompt}, KV cache {r.context} slots, "
             f"decode attention {r.decode_attention}"]
    for c in (r.prefill, r.decode):
        lines.append(f" {c.name}:")
        if isinstance(c, DoesNotFit):
            lines += [_per_device(c.inputs), f"    DOES NOT FIT: {c}", f"    try: {_SAMPLE_HINT}"]
            continue
        lines += format_compiled(c, r.topology.hbm_bytes)[:3]
        lines.append(f"    XLA FLOPs per device (layer loop once): {c.xla_flops:.3e}")
    return "\n".join(lines)
