"""`python -m llama_jax.aot plan`: the planner's command line, its ranked table and the recipe files of `--top K`.

    python -m llama_jax.aot plan --config configs/llama3.1-8b.py --topology v5p:2x4x4 \\
        [--global-batch-tokens N] [--top K] [--out DIR] [--budget-s S] [--jobs J] \\
        [--remat full,save_qkv_proj] [--grad-accum 2,4,8] [--meshes 1x32x1,1x16x2] [--hbm-gib G] [key=value ...]

Exit status 0 when some candidate fits, 1 when none does, 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
import pprint
import re
import sys
import textwrap
import time
from typing import List, Sequence

from llama_jax.aot import plan
from llama_jax.aot.projection import ICI
from llama_jax.aot.topology import GIB
from llama_jax.errors import AotError, LlamaJaxError


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 4 else f"{n / 2**20:.1f} MiB"


def _bytes(n: float) -> str:
    return f"{n / GIB:.1f}G" if n >= GIB / 10 else f"{n / 2**20:.1f}M"


def _seconds(s: float) -> str:
    return f"{s:.2f}" if s >= 0.1 else f"{s * 1e3:.2f}ms"


def format_plan(title: str, results: Sequence[plan.Result], skipped, generation: str) -> str:
    """The ranked table (results already ranked)."""
    counts = {s: sum(r.status == s for r in results) for s in
              ("fits", "does not fit", "invalid", "error", "not compiled (budget)")}
    skip = ", ".join(f"{n} {why}" for why, n in skipped.items()) or "none"
    lines = [title,
             f"  candidates: {len(results) + sum(skipped.values())} enumerated, {sum(skipped.values())} skipped "
             f"before compiling ({skip}); compiled {len(results) - counts['not compiled (budget)']}: "
             + ", ".join(f"{n} {s}" for s, n in counts.items() if n),
             f"  step time and MFU are a PROJECTION, not a measurement: compute = XLA's optimal_seconds scaled for "
             "the layer and accumulation scans ('roofline': XLA gave none, its FLOPs and HBM bytes at peak; 'peak': "
             f"below the analytic FLOPs at peak), + collective traffic over {ICI[generation][0] / 1e9:.0f} GB/s "
             "of ICI per chip one way, no overlap (llama_jax/aot/projection.py)",
             "",
             "| # | mesh (data, fsdp, tensor) | grad_accum | remat | fits | per chip / HBM | headroom | "
             "collective bytes per step by axis | projected compute s | projected collectives s | projected step s | "
             "projected MFU | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(results, 1):
        c, p = r.candidate, r.projection
        mem = f"{_gib(r.total)} / {_gib(r.hbm)}" if r.total else "—"
        head = f"{100 * r.headroom:.0f}%" if r.total else "—"
        if p is not None:
            axes = ", ".join(f"{a} {_bytes(b)}" for a, b in p.axis_bytes.items()) or "none"
            proj = [f"{_seconds(p.compute_s)}{'' if p.compute_from == 'xla' else f' ({p.compute_from})'}",
                    _seconds(p.collective_s), _seconds(p.step_s), f"{100 * p.mfu:.1f}%"]
        else:
            axes, proj = "—", ["—"] * 4
        fits = {"fits": "yes", "does not fit": "DOES NOT FIT"}.get(r.status, r.status)
        comp = f"{r.compile_s:.0f}" if r.compile_s else "—"
        lines.append(f"| {i} | {c.mesh} | {c.grad_accum} | {c.remat} | {fits} | {mem} | {head} | {axes} | "
                     + " | ".join(proj) + f" | {comp} |")
    notes = [f"  #{i}: {r.note}" for i, r in enumerate(results, 1) if r.note]
    return "\n".join(lines + ([""] + notes if notes else []))


def recipe_text(base: dict, cand: plan.Candidate, batch: int, source: str, topology: str, r: plan.Result) -> str:
    """A configs/-style recipe file: the planner's row as a docstring, the whole run config as a dict."""
    from llama_jax.training.run_config import RunConfig, apply_overrides

    cfg = apply_overrides(RunConfig.from_dict(base), cand.overrides(batch), parse=False)
    p = r.projection
    head = (f"Planner output for {source} on {topology}: mesh (data, fsdp, tensor) {cand.mesh}, grad_accum "
            f"{cand.grad_accum}, remat={cand.remat}.")
    body = (f"Compiled ahead of time: {_gib(r.total)} of {_gib(r.hbm)} per device ({100 * r.headroom:.0f}% "
            f"headroom). PROJECTION, not a measurement: {p.step_s:.3g} s per step, MFU {100 * p.mfu:.1f}% "
            "(python -m llama_jax.aot plan).")
    doc = '"""' + textwrap.fill(head, 110) + "\n\n" + textwrap.fill(body, 110) + '\n"""\n\n'
    call = "    return RunConfig.from_dict("
    tree = pprint.pformat(cfg.to_dict(), width=110, sort_dicts=False).replace("\n", "\n" + " " * len(call))
    return (doc + "from llama_jax.training.run_config import RunConfig\n\n\n"
            "def get_config() -> RunConfig:\n"
            f"{call}{tree})\n")


def write_recipes(ranked: Sequence[plan.Result], k: int, out: str, base: dict, batch: int, source: str,
                  topology: str) -> List[str]:
    """The best `k` candidates that fit, as recipe files under `out`; their paths."""
    os.makedirs(out, exist_ok=True)
    stem = os.path.splitext(os.path.basename(source))[0] if source else "default"
    paths = []
    for i, r in enumerate([r for r in ranked if r.status == "fits"][:k], 1):
        path = os.path.join(out, f"{stem}-{topology.replace(':', '-')}-plan{i}.py")
        with open(path, "w") as f:
            f.write(recipe_text(base, r.candidate, batch, source or "the default config", topology, r))
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------ command line
def _ints(flag: str, text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise AotError(f"{flag} {text!r}: expected positive integers separated by commas, e.g. 1,2,4")
    return values


def _meshes(text: str, devices: int) -> List[tuple]:
    out = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)x(\d+)x(\d+)\s*", item)
        if not m or int(m.group(1)) * int(m.group(2)) * int(m.group(3)) != devices:
            raise AotError(f"--meshes {item.strip()!r}: expected DATAxFSDPxTENSOR with a product of {devices} "
                           "(the slice's devices), e.g. 1x4x1")
        out.append(tuple(int(g) for g in m.groups()))
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="rank meshes, grad_accum and remat for a slice (compiled ahead of time)")
    p.add_argument("--config", default="", help="a recipe file, e.g. configs/llama3.1-8b.py")
    p.add_argument("--topology", required=True, help="e.g. v5p:2x4x4")
    p.add_argument("--global-batch-tokens", type=int, default=0, help="default: the recipe's batch_size x seq_len")
    p.add_argument("--top", type=int, default=0, help="write the best K that fit as recipe files")
    p.add_argument("--out", default="plans", help="folder for --top's recipe files")
    p.add_argument("--budget-s", type=float, default=1800.0, help="compile time budget, seconds")
    p.add_argument("--jobs", type=int, default=plan.default_jobs(), help="parallel compile processes")
    p.add_argument("--remat", default=",".join(plan.REMATS), help="remat policies to try")
    p.add_argument("--grad-accum", default="", help="grad_accum values to try (default: every divisor)")
    p.add_argument("--meshes", default="", help="(data, fsdp, tensor) shapes to try, e.g. 1x16x2,2x8x2")
    p.add_argument("--hbm-gib", type=float, default=0.0, help="judge fits by this HBM per chip (0: the chip's)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the recipe, e.g. seq_len=4096")


def _read(args: argparse.Namespace):
    """The checked inputs: (run config, global batch tokens, remats, grad_accums, topology, meshes, model)."""
    from llama_jax.aot.topology import get_topology
    from llama_jax.config import REMAT_POLICIES
    from llama_jax.training import run_config
    from llama_jax.training.setup import model_config

    cfg = run_config.build(args.config, args.overrides)
    tokens = args.global_batch_tokens or cfg.batch_size * cfg.seq_len
    if tokens <= 0 or tokens % cfg.seq_len:
        raise AotError(f"--global-batch-tokens {tokens}: expected a positive multiple of seq_len={cfg.seq_len}")
    remats = [r.strip() for r in args.remat.split(",") if r.strip()]
    if not remats or any(r not in REMAT_POLICIES for r in remats):
        raise AotError(f"--remat {args.remat!r}: expected a comma list of {', '.join(REMAT_POLICIES)}")
    for flag, value in (("--top", args.top), ("--jobs", args.jobs), ("--budget-s", args.budget_s),
                        ("--hbm-gib", args.hbm_gib)):
        if value < 0 or (flag == "--jobs" and value == 0):
            raise AotError(f"{flag} {value}: expected a {'positive' if flag == '--jobs' else 'non-negative'} number")
    accums = _ints("--grad-accum", args.grad_accum) if args.grad_accum else None
    topo = get_topology(args.topology)
    meshes = _meshes(args.meshes, len(topo.devices)) if args.meshes else None
    return cfg, tokens, remats, accums, topo, meshes, model_config(cfg)


def plan_cli(args: argparse.Namespace) -> int:
    from llama_jax.aot.cli import cpu_host

    cpu_host()
    try:
        cfg, tokens, remats, accums, topo, meshes, model = _read(args)
    except LlamaJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    batch = tokens // cfg.seq_len
    cands, skipped = plan.enumerate_candidates(model.num_heads, model.num_kv_heads, len(topo.devices), batch,
                                               accums, remats, meshes)
    own = plan.recipe_candidate(cfg, len(topo.devices), batch)
    cands.sort(key=lambda c: (c != own, plan.priority(c)))  # the recipe's own settings first
    hbm = int(args.hbm_gib * GIB / topo.devices_per_chip)
    base = cfg.to_dict()
    print(f"planning {len(cands)} candidates on {topo.name} ({args.jobs} job(s), budget {args.budget_s:.0f} s)",
          file=sys.stderr)
    t0 = time.monotonic()
    results = plan.compile_all([(base, c, batch, topo.name, hbm) for c in cands], args.budget_s, args.jobs,
                               lambda r: print(f"  {r.candidate.mesh} ga={r.candidate.grad_accum} "
                                               f"{r.candidate.remat}: {r.status}", file=sys.stderr))
    ranked = plan.rank(results)
    title = (f"Plan for {args.config or 'the default config'} ({model.name}) on {topo.name}: {topo.chips} chips, "
             f"{len(topo.devices)} devices, {_gib(hbm or topo.hbm_bytes)} HBM per device; global batch "
             f"{batch} x {cfg.seq_len} = {tokens:,} tokens; {time.monotonic() - t0:.0f} s")
    print(format_plan(title, ranked, skipped, topo.generation))
    if args.top:
        paths = write_recipes(ranked, args.top, args.out, base, batch, args.config, topo.name)
        for p in paths:
            print(f"recipe: {p}  (python train.py --config {p})")
        if not paths:
            print("no recipe written: no candidate fits")
    return 0 if any(r.status == "fits" for r in ranked) else 1
