"""TPU slices described by libtpu on a CPU host: the chip catalogue, `get_topology(name)` and the mesh over a
slice's devices (the real TPU compiler then compiles for them; nothing is allocated)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Any, Tuple

from llama_jax.errors import AotError, MeshError
from llama_jax.parallel.sharding import make_mesh

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


def topology_mesh(topology: Topology, *sizes: int, **named: int):
    """The mesh over the slice's devices, laid out on the physical torus: llama_jax.parallel.sharding.make_mesh
    with `devices=topology.devices` (sizes by position or axis name, one may be -1). A mesh that does not cover
    the slice exactly is an AotError that lists the valid sizes."""
    try:
        return make_mesh(*sizes, devices=topology.devices, **named)
    except MeshError as e:
        raise AotError(f"{topology.name}: {e}") from None
