"""Shared pieces of the benchmarks: machine/version record, the machine's limits measured in the same run
(dense float32 matmul peak, memory read bandwidth), timing, and output (one JSON line per measurement plus a
readable table).

Import this module BEFORE jax: it pins JAX to the CPU (the TPU compiler wheel is installed for the AOT tests
and would otherwise be probed) unless the caller has chosen a platform, and makes `llama_jax` importable
from a clean clone without installing it.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Callable, Iterable, Optional

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow-style C++ log spam from XLA at start-up hides the table.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Huge pages for XLA:CPU's per-call buffers, as train.py and sample.py run (llama_jax/cpu/host_memory.py): the
# script starts again with GLIBC_TUNABLES set. torch's caching allocator reuses its memory either way.
from llama_jax.cpu.host_memory import reexec_with_huge_pages  # noqa: E402

reexec_with_huge_pages()

import numpy as np  # noqa: E402


# ---------------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores() -> int:
    """Cores this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # not installed: the record says so rather than failing the run
            out[mod] = None
    return out


def machine() -> dict:
    rec = {"cpu": cpu_model(), "cores": cores(), **versions(),
           "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}  # huge pages or not (llama_jax/cpu/host_memory.py)
    try:
        import psutil
        rec["ram_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
        rec["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except Exception:
        pass
    try:
        import jax
        rec["jax_backend"] = jax.default_backend()
        rec["devices"] = [d.device_kind for d in jax.devices()]
    except Exception:
        pass
    return rec


def setup_torch():
    """torch with one intra-op thread per core (the brief: threads = core count)."""
    import torch
    torch.set_num_threads(cores())
    return torch


# ---------------------------------------------------------------------------------------------- output
_ROWS: list = []


def emit(bench: str, **fields) -> dict:
    """Print one JSON line for a measurement and keep it for the closing table."""
    rec = {"bench": bench, **{k: _round(v) for k, v in fields.items()}}
    print(json.dumps(rec), flush=True)
    _ROWS.append(rec)
    return rec


def _round(v):
    if isinstance(v, float):
        return float(f"{v:.4g}")
    return v


def table(rows: Optional[Iterable[dict]] = None, columns: Optional[list] = None) -> str:
    """A plain-text table of the emitted records (or `rows`), columns in first-seen order."""
    rows = list(_ROWS if rows is None else rows)
    if not rows:
        return ""
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns and not isinstance(r[k], (dict, list))]
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    out = [line(columns), line(["-" * w for w in widths])] + [line(row) for row in cells]
    return "\n".join(out)


def print_table(title: str, rows=None, columns=None):
    print(f"\n== {title} ==", flush=True)
    print(table(rows, columns), flush=True)


# ---------------------------------------------------------------------------------------------- timing
def best_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1, min_time: float = 0.0) -> float:
    """The fastest of `repeats` timed calls of `fn` (which must block until its work is done).

    The minimum, not the mean: on a shared machine noise only ever adds time."""
    for _ in range(warmup):
        fn()
    best, spent, n = float("inf"), 0.0, 0
    while n < repeats or spent < min_time:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent, n = min(best, dt), spent + dt, n + 1
    return best


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


# ---------------------------------------------------------------------------------------------- limits
def matmul_peak(n: int = 3072, repeats: int = 5) -> dict:
    """Dense float32 [n,n]x[n,n] matmul FLOP/s with jnp.dot and torch.mm (torch at `cores()` threads).
    Returns {"jax_gflops", "torch_gflops", "peak_gflops" (the better)}."""
    import jax
    import jax.numpy as jnp
    torch = setup_torch()
    flops = 2.0 * n ** 3
    rng = np.random.default_rng(0)
    a_np = rng.standard_normal((n, n), dtype=np.float32)
    b_np = rng.standard_normal((n, n), dtype=np.float32)
    a, b = jnp.asarray(a_np), jnp.asarray(b_np)
    dot = jax.jit(jnp.dot)
    t_jax = best_time(lambda: dot(a, b).block_until_ready(), repeats)
    ta, tb = torch.from_numpy(a_np), torch.from_numpy(b_np)
    out = torch.empty(n, n)
    t_torch = best_time(lambda: torch.mm(ta, tb, out=out), repeats)
    res = {"n": n, "jax_gflops": flops / t_jax / 1e9, "torch_gflops": flops / t_torch / 1e9}
    res["peak_gflops"] = max(res["jax_gflops"], res["torch_gflops"])
    return res


def memory_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict:
    """Memory READ bandwidth (what a decode step is bound by: it reads every weight once), GB/s.

    Measured three ways on a `gib` GiB float32 array (larger than the caches): a jitted jnp.sum, torch.sum at
    `cores()` threads, and numpy's sum (one thread). Returns each and "best_gbps" (the largest)."""
    import jax
    import jax.numpy as jnp
    torch = setup_torch()
    n = int(gib * 2**30) // 4
    x_np = np.ones(n, np.float32)
    nbytes = x_np.nbytes
    x = jnp.asarray(x_np)
    total = jax.jit(jnp.sum)
    t_jax = best_time(lambda: total(x).block_until_ready(), repeats)
    xt = torch.from_numpy(x_np)
    t_torch = best_time(lambda: xt.sum(), repeats)
    t_np = best_time(lambda: x_np.sum(), repeats)
    del x
    res = {"bytes": nbytes, "jax_sum_gbps": nbytes / t_jax / 1e9, "torch_sum_gbps": nbytes / t_torch / 1e9,
           "numpy_sum_gbps": nbytes / t_np / 1e9}
    res["best_gbps"] = max(res["jax_sum_gbps"], res["torch_sum_gbps"], res["numpy_sum_gbps"])
    return res


# ---------------------------------------------------------------------------------------------- models
def hf_model(config, dtype: str = "float32"):
    """A random transformers LlamaForCausalLM with our config's architecture (sdpa attention, eval mode)."""
    torch = setup_torch()
    import transformers
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(**config.to_hf_dict())
    model = transformers.LlamaForCausalLM(hf_config)
    return model.to(getattr(torch, dtype)).eval()


def peak_rss_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
