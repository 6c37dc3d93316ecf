"""Compile time of the training step against depth: 2, 8 and 32 layers of the bench-20m shape, each a fresh
`make_train_step` (a new jit, so nothing is cached between depths), lowered from abstract shapes (nothing is
allocated). Because the layers are one `nn.scan`, the compiled program holds one block whatever the depth and
compile time stays flat; the bar is compile(32 layers) <= 1.5 x compile(2 layers).

    python bench/compile.py
    python bench/compile.py --preset tiny --layers 2 4      # a smoke run

One JSON line per depth (trace+lower seconds, XLA compile seconds, their sum, HLO size), then a table.
"""

from __future__ import annotations

import argparse
import time

import common  # noqa: F401  (sets JAX_PLATFORMS before jax is imported)
from common import emit, machine, print_table

import jax
import jax.numpy as jnp

from llama_jax import LlamaConfig, param_shapes
from llama_jax.parallel.sharding import make_mesh
from llama_jax.training.optim import make_optimizer
from llama_jax.training.step import TrainState, make_train_step, state_shardings


def compile_seconds(cfg: LlamaConfig, batch: int, seq: int) -> dict:
    mesh = make_mesh(devices=jax.devices()[:1])  # every axis 1
    optimizer = make_optimizer(1e-4)
    shardings = state_shardings(cfg, optimizer, mesh)
    params = param_shapes(cfg)
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                       opt_state=jax.eval_shape(optimizer.init, params))
    tokens = {"tokens": jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)}
    t0 = time.perf_counter()
    step = make_train_step(cfg, optimizer, mesh, shardings=shardings)
    lowered = step.lower(state, tokens)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0,
            "stablehlo_chars": len(lowered.as_text())}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench-20m")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    args = p.parse_args()

    emit("machine", **machine())
    # Compile once untimed so one-off start-up costs (backend initialisation, first imports inside jax)
    # are not charged to the first depth.
    compile_seconds(LlamaConfig.from_preset("tiny"), 1, 8)
    rows = []
    for layers in args.layers:
        cfg = LlamaConfig.from_preset(args.preset, num_layers=layers)
        r = compile_seconds(cfg, args.batch, args.seq)
        rows.append(emit("compile_train_step", preset=args.preset, layers=layers, **r))
    base = rows[0]["total_s"]
    for r in rows:
        r["ratio_to_first"] = round(r["total_s"] / base, 3)
    ratio = rows[-1]["total_s"] / base
    emit("compile_ratio", deepest=args.layers[-1], shallowest=args.layers[0], ratio=ratio, bar=1.5,
         meets_bar=ratio <= 1.5)
    print_table(f"train-step compile time ({args.preset}, batch {args.batch}, seq {args.seq})", rows,
                ["layers", "lower_s", "compile_s", "total_s", "ratio_to_first", "stablehlo_chars"])


if __name__ == "__main__":
    main()
