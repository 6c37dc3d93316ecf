"""Ahead-of-time compilation for TPU slices, on a machine without a TPU.

With the `libtpu` wheel installed, `jax.experimental.topologies` describes a TPU slice (e.g. "v5p:4x4x4", 64
chips) on a CPU host, and a function jitted with shardings over a Mesh of those devices compiles with the real
TPU compiler. Nothing is allocated: every input is a `jax.ShapeDtypeStruct` carrying its sharding. From the
compiled program we read the per-chip memory (`memory_analysis`), XLA's FLOP count (`cost_analysis`) and the
collectives (`llama_jax.aot.hlo`).

    python train.py --config configs/llama3.1-8b.py --aot v5p:2x4x4      # the real train step
    python sample.py --checkpoint-config llama3.1-8b --aot v5e:2x4       # prefill + one decode step
    python -m llama_jax.aot train --config configs/NAME.py --topology v5p:4x4x4
    python -m llama_jax.aot plan --config configs/NAME.py --topology v5p:4x4x4 --top 1   # rank meshes, remat...

Notes on the numbers. Memory is per device (one chip; v4's topology lists each TensorCore as a device, so
there a device has half a chip's HBM). XLA's cost analysis counts a while-loop body once, so for a scanned
layer stack it is the cost of a one-layer model (and of one gradient-accumulation micro-batch); the report
compares it with the analytic count of exactly that and gives the analytic step FLOPs (the MFU numerator).

    topology.py       the chip catalogue, get_topology, the mesh over a slice's devices
    analysis.py       compile on abstract inputs; memory, FLOPs, collectives; analytic FLOPs; weight-gather check
    train_report.py   compile_train -> TrainReport          sample_report.py   compile_sample -> SampleReport
    report.py         the report text                        cli.py             the command lines
    hlo.py            reading the compiled HLO text
    plan.py           the planner: candidates, compiled in workers within a budget, ranked
    projection.py     projected step time and MFU           plan_report.py     the planner's table and recipes
"""

from llama_jax.aot import hlo
from llama_jax.aot.analysis import (Compiled, abstract, abstract_bytes_per_device, compile_and_analyze,
                                    hardware_flops_per_token, weight_gathers_over_tensor)
from llama_jax.aot.cli import cpu_host, main, sample_cli, train_cli
from llama_jax.aot.report import (format_collectives, format_compiled, format_does_not_fit, format_sample,
                                  format_train)
from llama_jax.aot.sample_report import SampleReport, compile_sample
from llama_jax.aot.topology import CHIPS, GIB, Chip, Topology, get_topology, topology_mesh, valid_topologies
from llama_jax.aot.train_report import TrainReport, compile_train
from llama_jax.errors import AotError, DoesNotFit

__all__ = ["hlo", "Compiled", "abstract", "abstract_bytes_per_device", "compile_and_analyze", "hardware_flops_per_token",
           "weight_gathers_over_tensor", "cpu_host", "main", "sample_cli", "train_cli", "format_collectives",
           "format_compiled", "format_does_not_fit", "format_sample", "format_train", "SampleReport",
           "compile_sample", "CHIPS", "GIB", "Chip", "Topology", "get_topology", "topology_mesh",
           "valid_topologies", "TrainReport", "compile_train", "AotError", "DoesNotFit"]
