"""Prefill time against prompt length: one forward pass over a prompt that fills the KV cache and returns the
last position's logits, ours (jitted, compiled once per length before timing) against transformers'
forward with `use_cache=True`, batch 1, float32, in one process.

    python bench/prefill.py                                   # bench-135m, lengths 128 .. 4096
    python bench/prefill.py --preset tiny --lengths 16 32     # a smoke run

One JSON line per (implementation, length), then a table. Time is the fastest of `--repeats` calls.
"""

from __future__ import annotations

import argparse
import time

import common  # noqa: F401  (sets JAX_PLATFORMS before jax is imported)
from common import best_time, emit, hf_model, machine, matmul_peak, print_table, setup_torch

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import Llama, LlamaConfig, init_cache, init_params
from llama_jax.model.flops import matmul_params


def make_prefill(cfg: LlamaConfig):
    """prefill(params, tokens [B, T]) -> (logits [B, 1, V] at the last position, cache [L, B, T, K, H])."""
    def prefill(params, tokens):
        b, t = tokens.shape
        cache = init_cache(cfg, b, t)
        last = jnp.full((b,), t - 1, jnp.int32)
        return Llama(cfg).apply({"params": params}, tokens, cache=cache, cache_index=0, logits_at=last)

    return jax.jit(prefill)


def forward_flops(cfg: LlamaConfig, t: int) -> float:
    """Forward FLOPs of a T-token prompt: 2 x matmul weights per token (the head only at the last position)
    plus causal attention (QK^T and PV over T/2 keys on average)."""
    weights = matmul_params(cfg) - cfg.hidden_size * cfg.vocab_size
    return 2.0 * weights * t + 2.0 * cfg.hidden_size * cfg.vocab_size + \
        2.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * t * t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench-135m")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--peak-n", type=int, default=3072)
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    args = p.parse_args()

    emit("machine", **machine())
    peak = matmul_peak(args.peak_n)
    emit("matmul_peak_f32", **peak)
    cfg = LlamaConfig.from_preset(args.preset, dtype="float32", param_dtype="float32",
                                  max_position_embeddings=max(max(args.lengths), 2048))
    params = init_params(cfg, jax.random.PRNGKey(0))
    prefill = make_prefill(cfg)
    hf = None if args.no_hf else hf_model(cfg)
    torch = setup_torch()
    rows = []
    rng = np.random.default_rng(0)
    for t in args.lengths:
        tokens = rng.integers(0, cfg.vocab_size, (1, t), dtype=np.int32)
        flops = forward_flops(cfg, t)
        x = jnp.asarray(tokens)
        t0 = time.perf_counter()
        jax.block_until_ready(prefill(params, x))
        first = time.perf_counter() - t0
        ours = best_time(lambda: jax.block_until_ready(prefill(params, x)), args.repeats, warmup=0)
        rows.append(emit("prefill", impl="llama_jax", preset=args.preset, prompt_len=t, seconds=ours,
                         tokens_per_s=t / ours, mfu=flops / ours / (peak["peak_gflops"] * 1e9),
                         first_call_s=first))
        if hf is not None:
            ids = torch.as_tensor(tokens, dtype=torch.long)

            def run_hf():
                with torch.no_grad():
                    hf(input_ids=ids, use_cache=True, logits_to_keep=1)

            theirs = best_time(run_hf, args.repeats, warmup=1)
            rows.append(emit("prefill", impl="transformers", preset=args.preset, prompt_len=t, seconds=theirs,
                             tokens_per_s=t / theirs, mfu=flops / theirs / (peak["peak_gflops"] * 1e9),
                             speedup_ours=theirs / ours))
    print_table(f"prefill ({args.preset}, batch 1, float32; matmul peak {peak['peak_gflops']:.0f} GFLOP/s)", rows,
                ["impl", "prompt_len", "seconds", "tokens_per_s", "mfu", "first_call_s", "speedup_ours"])


if __name__ == "__main__":
    main()
