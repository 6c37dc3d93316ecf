"""A projected step time and MFU for a train step compiled for a TPU slice: the planner's numbers.

Everything here is a *projection* from XLA's cost model and published interconnect bandwidths; nothing is
measured. Two parts, added (no overlap of communication with compute is assumed, so the step time is the slow
end of the model and the MFU the low end):

- compute: XLA's `optimal_seconds` for the compiled program. Like its FLOP count it counts each while-loop
  body once (the layer scan, the accumulation scan), so it is scaled the way `aot` compares XLA's FLOPs: by
  the analytic hardware FLOPs of the whole step over those of one layer and one micro-batch
  (`analysis.hardware_flops_per_token`). Where XLA gives no estimate (it reports a negative one for some
  programs), its own FLOP and HBM-byte counts at the chip's peak FLOP/s and HBM bandwidth (a roofline), scaled
  the same way. Never below the step's hardware FLOPs at the chip's peak (XLA undercounts its windowed
  matmuls; docs/TPU.md).
- collectives: every collective of the compiled HLO (with its loop trips, `aot.hlo`) as ring traffic per
  device — (n-1)/n of the bytes for an all-gather, reduce-scatter or all-to-all over n devices, twice that for
  an all-reduce, all of them for a collective-permute — over the chip's ICI bandwidth in one direction.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Dict, Sequence, Tuple

from llama_jax.aot import hlo

# Per-chip ICI bandwidth in one direction (bytes/s): half the bidirectional per-chip figure Google Cloud publishes.
ICI: Dict[str, Tuple[float, str]] = {
    "v4": (1.1e15 / 4096, "cloud.google.com/tpu/docs/v4: all-reduce bandwidth per Pod 1.1 PB/s over 4096 chips "
                          "(no per-chip ICI figure is published for v4)"),
    "v5e": (400e9 / 2, "cloud.google.com/tpu/docs/v5e: bidirectional ICI bandwidth per chip 400 GBps"),
    "v5p": (1200e9 / 2, "cloud.google.com/tpu/docs/v5p: bidirectional ICI bandwidth per chip 1200 GBps "
                        "(4800 Gbps)"),
    "v6e": (800e9 / 2, "cloud.google.com/tpu/docs/v6e: bidirectional ICI bandwidth per chip 800 GBps"),
}

# HBM bandwidth per chip (bytes/s), from the same pages: for the roofline when XLA gives no optimal_seconds.
HBM_BANDWIDTH = {"v4": 1200e9, "v5e": 800 * 2**30, "v5p": 2765e9, "v6e": 1638e9}


@dataclasses.dataclass(frozen=True)
class Projection:
    """Projected seconds per step (compute + collectives) and the MFU that means (analytic model FLOPs)."""

    compute_s: float
    compute_from: str               # "xla" (optimal_seconds), "roofline" (XLA's FLOPs and bytes) or "peak"
    collective_s: float
    axis_bytes: Dict[str, int]      # collective bytes per device per step, by mesh axes ("fsdp", "fsdp×tensor")
    step_s: float
    mfu: float


def ring_traffic(c: hlo.Collective, mesh_shape: Dict[str, int]) -> float:
    """Bytes one device sends per step for collective `c` on a ring over its mesh axes."""
    if c.kind == "collective-permute":
        return float(c.step_bytes)
    n = math.prod(mesh_shape.values()) if "?" in c.axes else math.prod(mesh_shape.get(a, 1) for a in c.axes)
    if n <= 1:
        return 0.0
    share = (n - 1) / n
    return c.step_bytes * share * (2 if c.kind == "all-reduce" else 1)


def bytes_by_axis(colls: Sequence[hlo.Collective]) -> Dict[str, int]:
    """Collective bytes per device per step, summed by the mesh axes they run over, largest first."""
    acc = defaultdict(int)
    for c in colls:
        acc["×".join(c.axes) or "-"] += c.step_bytes
    return dict(sorted(acc.items(), key=lambda kv: -kv[1]))


def project(report) -> Projection:
    """The projection for a `train_report.TrainReport`."""
    from llama_jax.aot.analysis import hardware_flops_per_token

    topo, devices = report.topology, len(report.topology.devices)
    tokens = report.batch_size * report.seq_len
    step_hw = hardware_flops_per_token(report.config, report.seq_len) * tokens  # whole step, all devices
    one_hw = report.xla_check[1]  # one layer, one micro-batch: what XLA's cost analysis covered
    at_peak = step_hw / (devices * topo.peak_flops)
    c, scale = report.compiled, (step_hw / one_hw if one_hw > 0 else 0.0)
    if c.optimal_seconds > 0:
        scaled, source = c.optimal_seconds * scale, "xla"
    else:
        hbm_bw = HBM_BANDWIDTH[topo.generation] / topo.devices_per_chip
        scaled, source = max(c.xla_flops / topo.peak_flops, c.bytes_accessed / hbm_bw) * scale, "roofline"
    compute, source = (scaled, source) if scaled >= at_peak else (at_peak, "peak")
    bandwidth = ICI[topo.generation][0] / topo.devices_per_chip
    comm = sum(ring_traffic(c, report.mesh_shape) for c in report.compiled.collectives) / bandwidth
    step = compute + comm
    mfu = report.flops_per_step / (step * devices * topo.peak_flops) if step > 0 else 0.0
    return Projection(compute, source, comm, bytes_by_axis(report.compiled.collectives), step, mfu)
