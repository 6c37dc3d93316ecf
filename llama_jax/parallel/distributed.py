"""Many hosts, one program: `jax.distributed` start-up, per-process batches, and process-0 logging.

Every process runs the same script. `initialize()` joins them (from the `--coordinator-address`,
`--num-processes`, `--process-id` flags, or automatically on a TPU pod slice where jax finds its peers
itself); from then on `jax.devices()` lists the devices of all processes and a mesh spans them all.
Each process loads only the rows of the global batch that live on its own devices (`process_batch_rows`)
and `global_batch` assembles the global, sharded `jax.Array`s from them without any host holding the rest.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import warnings
from typing import Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from llama_jax.parallel.sharding import DEFAULT_RULES, batch_sharding

# Environment variables that mean "this is one host of a TPU pod slice": jax.distributed finds the
# coordinator and this host's id from the TPU metadata on its own.
_TPU_POD_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "TPU_PROCESS_ADDRESSES")
_GOOGLE_PCI_VENDOR = "0x1ae0"


def add_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add --coordinator-address, --num-processes, --process-id to a script's argument parser (the old
    underscore spellings are accepted quietly)."""
    group = parser.add_argument_group("multi-host (leave out on a single host or a TPU pod slice)")
    group.add_argument("--coordinator-address", default=None,
                       help="host:port of process 0, reachable from every process")
    group.add_argument("--num-processes", type=int, default=None, help="number of processes (hosts)")
    group.add_argument("--process-id", type=int, default=None, help="this process's index, 0..num_processes-1")
    for old, type_ in (("--coordinator_address", str), ("--num_processes", int), ("--process_id", int)):
        group.add_argument(old, type=type_, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _tpu_chips_attached() -> bool:
    """True when Google TPU chips sit on this host's PCI bus (a Cloud TPU VM), without starting jax."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def _on_tpu_pod() -> bool:
    """A host of a TPU slice: GKE / multislice set the worker list in the environment; a Cloud TPU VM has the
    chips on its PCI bus (jax then reads the slice's workers from the VM metadata). CPU-only runs say so."""
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return False
    # libtpu may leave a warning sentence in TPU_WORKER_HOSTNAMES when it cannot reach the metadata server:
    # only a list of several host names counts.
    hosts = [h.strip() for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    several_hosts = len(hosts) > 1 and all(re.fullmatch(r"[A-Za-z0-9_.:-]+", h) for h in hosts)
    return several_hosts or any(os.environ.get(k) for k in _TPU_POD_ENV[1:]) or _tpu_chips_attached()


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, timeout_s: int = 300) -> bool:
    """Join the processes of a multi-host run; call before anything else touches jax devices.

    With all three arguments: an explicit cluster (CPU/GPU hosts, or tests on 127.0.0.1). With none: on a TPU
    pod slice jax discovers its peers itself; elsewhere this is a single-process run and nothing happens.
    CPU processes exchange data through gloo collectives. Returns True when running multi-process.
    """
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError("multi-host: give all of --coordinator-address, --num-processes and --process-id, "
                         f"or none of them (found coordinator_address={coordinator_address!r}, "
                         f"num_processes={num_processes!r}, process_id={process_id!r})")
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if all(given):
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"multi-host: process_id={process_id} must be in [0, num_processes={num_processes})")
        if num_processes == 1:
            return False
        # Only the CPU client reads this; without it cross-process collectives on CPU fail at run time.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout_s)
        return True
    if _on_tpu_pod():
        try:
            jax.distributed.initialize(initialization_timeout=timeout_s)
        except (RuntimeError, ValueError) as e:  # a single TPU VM outside any slice: nothing to join
            warnings.warn(f"multi-host: TPU found but jax.distributed could not discover a slice ({e}); "
                          "running as a single process")
            return False
        return jax.process_count() > 1
    return False


def initialize_from_args(args: argparse.Namespace) -> bool:
    """`initialize` from the flags of `add_flags`."""
    return initialize(args.coordinator_address, args.num_processes, args.process_id)


def is_main_process() -> bool:
    """True on process 0: the one that logs, prints progress bars and writes metrics files."""
    return jax.process_index() == 0


def _batch_rows_per_shard(sharding: NamedSharding, global_batch_size: int):
    """[(start, stop)] of the batch rows held by this process's devices, distinct and sorted."""
    shape = (global_batch_size,)
    spans = {(idx[0].start or 0, global_batch_size if idx[0].stop is None else idx[0].stop)
             for idx in sharding.addressable_devices_indices_map(shape).values()}
    return sorted(spans)


def process_batch_rows(mesh: Mesh, global_batch_size: int, rules=DEFAULT_RULES) -> np.ndarray:
    """Indices of the global batch's rows that this process must load (int64 [B_local], sorted).

    With the batch split over data×fsdp and each host's devices contiguous in the mesh this is one
    contiguous range (process p of P gets rows p*B/P .. (p+1)*B/P-1); other meshes may give several ranges,
    or the whole batch when the batch axes do not cross hosts (every process then loads the same rows)."""
    sharding = batch_sharding(mesh, rules, ("batch",), (global_batch_size,))
    spans = _batch_rows_per_shard(sharding, global_batch_size)
    return np.concatenate([np.arange(a, b) for a, b in spans]).astype(np.int64)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, global_batch_size: int,
                 rules=DEFAULT_RULES) -> dict:
    """Global batch-sharded jax.Arrays [B, ...] from this process's rows (`process_batch_rows`) of each
    array. Every process calls it with its own rows; no process ever holds the whole batch."""
    sharding = batch_sharding(mesh, rules, ("batch",), (global_batch_size,))
    expected = len(process_batch_rows(mesh, global_batch_size, rules))
    out = {}
    for name, x in local.items():
        x = np.asarray(x)
        if x.shape[0] != expected:
            raise ValueError(f"global_batch: local '{name}' has {x.shape[0]} rows; process {jax.process_index()} "
                             f"holds {expected} of the global batch of {global_batch_size} on this mesh "
                             "(see process_batch_rows)")
        out[name] = jax.make_array_from_process_local_data(sharding, x, (global_batch_size,) + x.shape[1:])
    return out


def to_host(x: jax.Array) -> np.ndarray:
    """A replicated (or fully addressable) jax.Array as numpy on every process, e.g. metrics for logging."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_shards[0].data)
    raise ValueError(f"to_host: array of shape {x.shape} with sharding {x.sharding} spans other processes; "
                     "gather it with jax.experimental.multihost_utils.process_allgather")


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (nothing to do on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def differing_processes(value: str) -> list:
    """The processes whose `value` differs from process 0's ([] when all agree, or on one process): a check
    that every host built or read the same thing (a digest), before they train on it together."""
    if jax.process_count() == 1:
        return []
    import hashlib

    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(value.encode()).digest(), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(digest))  # [processes, 32]
    return [i for i in range(every.shape[0]) if not np.array_equal(every[i], every[0])]


def all_processes(flag: bool) -> bool:
    """True when `flag` is true on every process (a collective: every process calls it)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))).min())
