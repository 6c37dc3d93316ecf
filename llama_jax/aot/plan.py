"""The planner: every mesh, gradient-accumulation and remat setting that gives a recipe's global batch on a TPU
slice, each compiled ahead of time (`train_report.compile_train`, in worker processes where cores allow,
within a time budget), ranked by fit and projected step time (`aot.projection`; a projection, not a
measurement). The table and the recipe files: `plan_report.py`; the command line: `python -m llama_jax.aot plan`.

A candidate is (data, fsdp, tensor) with data × fsdp × tensor = the slice's devices, grad_accum, remat. Skipped
before compiling, and counted: tensor sizes that do not divide both the query and the KV heads, and micro-batches
(batch / grad_accum sequences) that do not split over data × fsdp.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from llama_jax.errors import AotError

# The order remat policies are tried in when a budget runs short: the cheapest memory first.
REMATS = ("full", "save_qkv_proj", "dots_no_batch", "dots", "none")
SKIP_TENSOR = "tensor does not divide the query and KV heads"
SKIP_BATCH = "micro-batch not divisible by data × fsdp"


@dataclasses.dataclass(frozen=True)
class Candidate:
    data: int
    fsdp: int
    tensor: int
    grad_accum: int
    remat: str

    def overrides(self, batch_size: int) -> Dict[str, object]:
        """The run-config keys this candidate sets (RunConfig dotted keys)."""
        return {"batch_size": batch_size, "grad_accum": self.grad_accum, "model.remat": self.remat,
                "mesh.data": self.data, "mesh.fsdp": self.fsdp, "mesh.tensor": self.tensor}

    @property
    def mesh(self) -> str:
        return f"({self.data}, {self.fsdp}, {self.tensor})"


@dataclasses.dataclass
class Result:
    """One candidate's outcome. status: fits | does not fit | invalid | error | not compiled (budget)."""

    candidate: Candidate
    status: str
    total: int = 0                  # compiled bytes per device (0 when XLA refused the program)
    hbm: int = 0                    # per-device HBM it was judged against
    projection: Optional[object] = None  # projection.Projection
    compile_s: float = 0.0
    note: str = ""

    @property
    def headroom(self) -> float:
        return 1.0 - self.total / self.hbm if self.hbm and self.total else 0.0


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_candidates(heads: int, kv_heads: int, devices: int, batch: int,
                         grad_accums: Optional[Sequence[int]] = None, remats: Sequence[str] = REMATS,
                         meshes: Optional[Sequence[Tuple[int, int, int]]] = None) -> Tuple[List[Candidate], Counter]:
    """Candidates for `devices` devices and a global batch of `batch` sequences, and {reason: count} of those
    skipped as trivially invalid. `meshes` restricts the (data, fsdp, tensor) shapes tried."""
    accums = sorted(grad_accums) if grad_accums else _divisors(batch)
    shapes = list(meshes) if meshes else [(d, devices // (d * t), t) for t in _divisors(devices)
                                          for d in _divisors(devices // t)]
    out, skipped = [], Counter()
    for data, fsdp, tensor in shapes:
        for accum in accums:
            for remat in remats:
                if heads % tensor or kv_heads % tensor:
                    skipped[SKIP_TENSOR] += 1
                elif batch % accum or (batch // accum) % (data * fsdp):
                    skipped[SKIP_BATCH] += 1
                else:
                    out.append(Candidate(data, fsdp, tensor, accum, remat))
    return out, skipped


def priority(c: Candidate) -> Tuple:
    """Compile order when the budget may not cover every candidate: the recipe-like settings first (cheapest
    remat in memory, less tensor parallelism, no data replication of the weights, bigger micro-batches)."""
    return (REMATS.index(c.remat) if c.remat in REMATS else len(REMATS), c.tensor, c.data, c.grad_accum)


def recipe_candidate(cfg, devices: int, batch: int) -> Optional[Candidate]:
    """The run config's own settings as a candidate (its fsdp=-1 resolved), or None if they do not apply."""
    m = cfg.mesh
    fsdp = m.fsdp if m.fsdp > 0 else devices // max(m.data * m.tensor, 1)
    if m.data * fsdp * m.tensor != devices or cfg.batch_size != batch:
        return None
    return Candidate(m.data, fsdp, m.tensor, cfg.grad_accum, cfg.model.remat)


# ------------------------------------------------------------------------------------------------ compiling
def compile_one(payload) -> Result:
    """Compile one candidate (in this process or a worker): payload = (run-config dict, candidate, batch size,
    topology name, per-device HBM to judge the fit by, or 0 for the chip's own)."""
    from llama_jax.aot.projection import project
    from llama_jax.aot.train_report import compile_train
    from llama_jax.errors import DoesNotFit
    from llama_jax.training.run_config import RunConfig, apply_overrides

    base, cand, batch, topology, hbm = payload
    t0 = time.perf_counter()
    try:
        cfg = apply_overrides(RunConfig.from_dict(base), cand.overrides(batch), parse=False)
        report = compile_train(cfg, topology, "plan")
    except DoesNotFit as e:
        return Result(cand, "does not fit", compile_s=time.perf_counter() - t0, note=f"XLA: {e}")
    except AotError as e:
        return Result(cand, "invalid", compile_s=time.perf_counter() - t0, note=str(e).split("\n")[0])
    except Exception as e:  # one candidate's failure must not end the plan
        return Result(cand, "error", compile_s=time.perf_counter() - t0,
                      note=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    hbm = hbm or report.topology.hbm_bytes
    total = report.compiled.total
    return Result(cand, "fits" if total <= hbm else "does not fit", total, hbm, project(report),
                  report.compiled.compile_s)


def _worker_init():
    from llama_jax.aot.cli import cpu_host
    cpu_host()


def compile_all(payloads: Sequence[tuple], budget_s: float, jobs: int,
                progress: Callable[[Result], None] = lambda r: None) -> List[Result]:
    """Compile every payload (see `compile_one`) within `budget_s` seconds, `jobs` at a time. jobs=1 runs in
    this process (a compile under way when the budget ends still finishes); otherwise in `jobs` spawned
    worker processes, stopped when the budget ends. Payloads not compiled in time: "not compiled (budget)"."""
    deadline = time.monotonic() + budget_s
    done: Dict[int, Result] = {}
    if jobs <= 1:
        for i, p in enumerate(payloads):
            if time.monotonic() >= deadline:
                break
            done[i] = compile_one(p)
            progress(done[i])
    else:
        pool = multiprocessing.get_context("spawn").Pool(jobs, initializer=_worker_init)
        try:
            it = pool.imap_unordered(_indexed, list(enumerate(payloads)))
            for _ in payloads:
                i, r = it.next(timeout=max(deadline - time.monotonic(), 0.001))
                done[i] = r
                progress(r)
        except multiprocessing.TimeoutError:
            pass
        finally:
            pool.terminate()  # the workers this call started, compiles still running included
            pool.join()
    return [done.get(i) or Result(p[1], "not compiled (budget)") for i, p in enumerate(payloads)]


def _indexed(item):
    i, payload = item
    return i, compile_one(payload)


def rank(results: Sequence[Result]) -> List[Result]:
    """Fits first, then by projected step time; then the refused, then what was not compiled."""
    order = {"fits": 0, "does not fit": 1, "not compiled (budget)": 2, "invalid": 3, "error": 4}

    def key(r: Result):
        step = r.projection.step_s if r.projection is not None else float("inf")
        return order.get(r.status, 5), step, priority(r.candidate)
    return sorted(results, key=key)


def default_jobs() -> int:
    """Worker processes: one per two cores (a TPU compile is itself multi-threaded), at most 8."""
    return max(1, min(8, (os.cpu_count() or 1) // 2))
