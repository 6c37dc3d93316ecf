"""Training-step throughput and MFU: our jitted train step (forward, backward, AdamW; `llama_jax.training.step`)
against transformers' LlamaForCausalLM + torch.optim.AdamW, same config, batch and sequence, float32, in one
process. MFU = analytic model FLOPs per second (`llama_jax.model.flops.train_flops_per_token`: 6 x matmul
weights + causal attention) / the dense float32 matmul peak measured in the same run.

    python bench/train.py                       # bench-20m and bench-120m, batch 4, sequence 512
    python bench/train.py --presets tiny --seq 64 --steps 2     # a smoke run

Prints one JSON line per measurement, then a table. Per-step time is the fastest of `--steps` timed steps
after a warm-up step (noise on a shared machine only adds time); the median is recorded too.
"""

from __future__ import annotations

import argparse
import time

import common  # noqa: F401  (sets JAX_PLATFORMS before jax is imported)
from common import emit, hf_model, machine, matmul_peak, print_table, setup_torch

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import LlamaConfig, init_params
from llama_jax.model.flops import num_params, train_flops_per_token


def bench_ours(cfg: LlamaConfig, tokens: np.ndarray, steps: int, lr: float) -> dict:
    from llama_jax.parallel.sharding import make_mesh
    from llama_jax.training.optim import make_optimizer
    from llama_jax.training.step import init_train_state, make_train_step, state_shardings

    mesh = make_mesh(devices=jax.devices()[:1])  # every axis 1
    # No clipping, no decay mask subtleties: the same update rule as the torch side (plain AdamW).
    optimizer = make_optimizer(lr, clip_norm=None)
    shardings = state_shardings(cfg, optimizer, mesh)
    params = jax.device_put(init_params(cfg, jax.random.PRNGKey(0)), shardings.params)
    state = init_train_state(params, optimizer, shardings)
    step = make_train_step(cfg, optimizer, mesh, shardings=shardings)
    batch = {"tokens": jnp.asarray(tokens)}

    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    first_loss = float(metrics["loss"])
    compile_and_first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        metrics["loss"].block_until_ready()
        times.append(time.perf_counter() - t0)
    return {"times": times, "first_step_s": compile_and_first, "loss0": first_loss,
            "loss_last": float(metrics["loss"])}


def bench_hf(cfg: LlamaConfig, tokens: np.ndarray, steps: int, lr: float) -> dict:
    torch = setup_torch()
    model = hf_model(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    inputs = torch.as_tensor(tokens[:, :-1], dtype=torch.long)
    labels = torch.as_tensor(tokens[:, 1:], dtype=torch.long)

    def one_step():
        logits = model(input_ids=inputs).logits  # [B, T, V] float32
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    t0 = time.perf_counter()
    first_loss = one_step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = one_step()
        times.append(time.perf_counter() - t0)
    return {"times": times, "first_step_s": first, "loss0": first_loss, "loss_last": loss,
            "attn_implementation": model.config._attn_implementation}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["bench-20m", "bench-120m"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed steps per framework (after one warm-up)")
    p.add_argument("--peak-n", type=int, default=3072, help="matmul size for the float32 peak")
    p.add_argument("--only", choices=["ours", "hf"], default=None, help="skip the other framework")
    args = p.parse_args()

    mach = machine()
    emit("machine", **mach)
    peak = matmul_peak(args.peak_n)
    emit("matmul_peak_f32", **peak)
    rows = []
    for name in args.presets:
        cfg = LlamaConfig.from_preset(name, dtype="float32", param_dtype="float32")
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1), dtype=np.int32)
        flops_tok = train_flops_per_token(cfg, args.seq)
        tok_per_step = args.batch * args.seq
        results = {}
        for impl, fn in (("llama_jax", bench_ours), ("transformers", bench_hf)):
            if args.only and {"ours": "llama_jax", "hf": "transformers"}[args.only] != impl:
                continue
            r = fn(cfg, tokens, args.steps, 1e-4)
            best, med = min(r["times"]), float(np.median(r["times"]))
            tps = tok_per_step / best
            mfu = tps * flops_tok / (peak["peak_gflops"] * 1e9)
            results[impl] = tps
            rows.append(emit("train_step", impl=impl, preset=name, params_m=num_params(cfg) / 1e6,
                             batch=args.batch, seq=args.seq, step_s=best, step_s_median=med,
                             tokens_per_s=tps, model_gflops_per_s=tps * flops_tok / 1e9, mfu=mfu,
                             first_step_s=r["first_step_s"], loss0=r["loss0"], loss_last=r["loss_last"],
                             **({"attn": r["attn_implementation"]} if "attn_implementation" in r else {})))
        if len(results) == 2:
            rows.append(emit("train_speedup", preset=name,
                             speedup=results["llama_jax"] / results["transformers"], bar=1.2,
                             meets_bar=results["llama_jax"] / results["transformers"] >= 1.2))
    print_table(f"train step (float32, matmul peak {peak['peak_gflops']:.0f} GFLOP/s: jax "
                f"{peak['jax_gflops']:.0f}, torch {peak['torch_gflops']:.0f}; {mach['cpu']}, {mach['cores']} cores)",
                [r for r in rows if r["bench"] == "train_step"],
                ["impl", "preset", "params_m", "batch", "seq", "step_s", "step_s_median", "tokens_per_s", "mfu",
                 "first_step_s", "loss0", "loss_last"])
    print_table("speedup (bar 1.2x, MFU bar 0.6)", [r for r in rows if r["bench"] == "train_speedup"])


if __name__ == "__main__":
    main()
