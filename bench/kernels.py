"""The kernels the other figures stand on: XLA:CPU (through jax) against PyTorch on the same shapes, in one run.
This is the evidence behind the gaps in BENCHMARKS.md: where a framework's own matmul or matrix-vector product
is slower, no model code around it can make up the difference.

    python bench/kernels.py                 # all of it, about two minutes
    python bench/kernels.py --quick         # smaller shapes, a smoke run

1. **matmul**: float32 [M, C] x [C, O] at the train step's shapes (M = batch 4 x 512 tokens; the q/o, MLP and
   output-head projections of bench-20m and bench-120m) and the square product that sets the MFU peak:
   `jnp.dot` (jitted) against `torch.mm`, GFLOP/s.
2. **decode matvecs**: one decode step's weight reads at batch 1 for bench-135m: per layer q, k, v, o, gate, up,
   down (30 layers, one buffer per weight, as `unstack_layers` leaves them) in float32 and bfloat16. Ours is one
   jitted chain of `jnp.dot`s (bfloat16 weights with a float32 result, as the model computes); theirs is
   torch.nn.functional.linear on [out, in] weights, as transformers runs it. GB/s of weights read, against the
   read bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import common  # noqa: F401  (sets JAX_PLATFORMS before jax is imported)
from common import best_time, emit, machine, memory_bandwidth, print_table, setup_torch

import jax
import jax.numpy as jnp
import numpy as np

# (name, C, O) of the projections, at M = 2048 rows
TRAIN_SHAPES = [("20m q/o", 384, 384), ("20m gate/up", 384, 1024), ("20m down", 1024, 384), ("20m head", 384, 8192),
                ("120m q/o", 768, 768), ("120m gate/up", 768, 2048), ("120m down", 2048, 768),
                ("120m head", 768, 32000)]
# bench-135m: hidden 576, 9 heads and 3 KV heads of 64, MLP 1536, 30 layers
DECODE_LAYER = [("q", 576, 576), ("k", 576, 192), ("v", 576, 192), ("o", 576, 576), ("gate", 576, 1536),
                ("up", 576, 1536), ("down", 1536, 576)]


def matmul_rows(rows: int, shapes, square: int, repeats: int) -> list:
    torch = setup_torch()
    out = []
    for name, c, o in shapes + [(f"square {square}", square, square)]:
        m = square if name.startswith("square") else rows
        rng = np.random.default_rng(0)
        x_np, w_np = rng.standard_normal((m, c), np.float32), rng.standard_normal((c, o), np.float32)
        x, w = jnp.asarray(x_np), jnp.asarray(w_np)
        dot = jax.jit(jnp.dot)
        t_jax = best_time(lambda: dot(x, w).block_until_ready(), repeats)
        xt, wt = torch.from_numpy(x_np), torch.from_numpy(w_np)
        t_torch = best_time(lambda: torch.mm(xt, wt), repeats)
        flops = 2 * m * c * o
        out.append(emit("kernel", kernel="matmul", shape=name, m=m, c=c, o=o, jax_gflops=flops / t_jax / 1e9,
                        torch_gflops=flops / t_torch / 1e9, jax_vs_torch=t_torch / t_jax))
    return out


def decode_rows(layers: int, dtype: str, read_gbps: float, repeats: int) -> dict:
    torch = setup_torch()
    rng = np.random.default_rng(1)
    shapes = DECODE_LAYER * layers
    weights = [(rng.standard_normal((c, o), np.float32) * 0.02) for _, c, o in shapes]
    nbytes = sum(w.size for w in weights) * jnp.dtype(dtype).itemsize
    ours = [jnp.asarray(w, dtype) for w in weights]  # [C, O], as our parameters lie
    theirs = [torch.from_numpy(np.ascontiguousarray(w.T)).to(getattr(torch, dtype)) for w in weights]  # [O, C]

    def mm(a, w):  # as the model computes: weights' dtype in, float32 out
        return jnp.dot(a.astype(w.dtype), w, preferred_element_type=jnp.float32)

    def chain_jax(x, ws):
        for i in range(0, len(ws), 7):
            q, k, v, o, g, u, d = ws[i:i + 7]
            att = mm(x, q) + 1e-3 * (jnp.sum(mm(x, k)) + jnp.sum(mm(x, v)))  # keeps k and v live
            x = x + mm(att, o)
            x = x + mm(jax.nn.silu(mm(x, g)) * mm(x, u), d)
        return x

    def chain_torch(x, ws):
        f = torch.nn.functional
        with torch.no_grad():
            for i in range(0, len(ws), 7):
                q, k, v, o, g, u, d = ws[i:i + 7]
                att = f.linear(x, q) + 1e-3 * (f.linear(x, k).sum() + f.linear(x, v).sum())
                x = x + f.linear(att, o)
                x = x + f.linear(f.silu(f.linear(x, g)) * f.linear(x, u), d)
        return x

    x = jnp.ones((1, 576), jnp.float32)
    run = jax.jit(chain_jax)
    t_jax = best_time(lambda: run(x, ours).block_until_ready(), repeats)
    xt = torch.ones((1, 576), dtype=getattr(torch, dtype))
    t_torch = best_time(lambda: chain_torch(xt, theirs), repeats)
    return emit("kernel", kernel="decode_matvecs", dtype=dtype, layers=layers, weight_bytes=nbytes,
                jax_ms=t_jax * 1e3, torch_ms=t_torch * 1e3, jax_gbps=nbytes / t_jax / 1e9,
                torch_gbps=nbytes / t_torch / 1e9, read_gbps=read_gbps, jax_frac_of_read=nbytes / t_jax / 1e9 / read_gbps)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats (a smoke run)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    start = time.time()
    emit("machine", **machine())
    if args.quick:
        rows, shapes, square, layers, repeats, gib = 64, TRAIN_SHAPES[:2], 256, 2, 2, 0.05
    else:
        rows, shapes, square, layers, repeats, gib = 2048, TRAIN_SHAPES, 3072, 30, args.repeats, 1.0
    bw = memory_bandwidth(gib)
    emit("memory_bandwidth", **bw)
    mm = matmul_rows(rows, shapes, square, repeats)
    mv = [decode_rows(layers, dtype, bw["best_gbps"], repeats) for dtype in ("float32", "bfloat16")]
    print_table("float32 matmul, GFLOP/s", mm, ["shape", "m", "c", "o", "jax_gflops", "torch_gflops", "jax_vs_torch"])
    print_table(f"decode-step matvecs at batch 1 (read bandwidth {bw['best_gbps']:.1f} GB/s)", mv,
                ["dtype", "weight_bytes", "jax_ms", "torch_ms", "jax_gbps", "torch_gbps", "jax_frac_of_read"])
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
