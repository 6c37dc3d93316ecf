"""Decode throughput: our compiled sampler (`llama_jax.sampling.generate_ids`, greedy, prefill + while_loop
decode) against transformers' `generate` (greedy, KV cache, `min_new_tokens` = `max_new_tokens` so both make
exactly the same number of tokens), at batch 1 and 8, float32 and bfloat16 weights, and against the memory
roofline: the bytes a decode step must read (every weight once, plus the KV cache of the context so far)
divided by the memory read bandwidth measured in the same run.

    python bench/decode.py                                      # bench-135m, prompt 64, 128 new tokens
    python bench/decode.py --preset tiny --new 16 --batches 1   # a smoke run

Decode tokens/s counts the steps only: (time to make `--new` tokens - time to make 1 token, i.e. the prefill
and first token) / (new - 1) steps, each the fastest of `--repeats` runs. End-to-end tokens/s (prefill
included) is recorded too. One JSON line per (impl, dtype, batch), then a table.

Ours runs twice: `llama_jax` is `generate_ids` on the parameters as loaded (layers stacked [L, ...], the layout
on TPU) and `llama_jax+per_layer` on `cpu.decode_layout.unstack_layers(params, fuse=True)` (one buffer per layer,
q/k/v and gate/up joined, and a per-layer KV cache), which is what `Sampler` uses by default on a CPU.
"""

from __future__ import annotations

import argparse

import common  # noqa: F401  (sets JAX_PLATFORMS before jax is imported)
from common import best_time, emit, hf_model, machine, memory_bandwidth, print_table, setup_torch

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import LlamaConfig, init_params
from llama_jax.sampling import Greedy, generate_ids

from llama_jax.cpu.decode_layout import unstack_layers
from llama_jax.model.flops import num_params


def step_bytes(cfg: LlamaConfig, batch: int, context: float, itemsize: int) -> float:
    """Bytes one decode step must read: every weight once (the output head once; an untied input embedding
    only for the B rows it looks up, which is negligible) and the K and V cache of `context` tokens."""
    weights = num_params(cfg, include_embedding=False)
    if cfg.tie_word_embeddings:
        weights += cfg.vocab_size * cfg.hidden_size  # the tied embedding is read whole as the output head
    kv = 2 * cfg.num_layers * batch * context * cfg.num_kv_heads * cfg.head_dim
    return (weights + kv) * itemsize


def time_ours(cfg, params, prompts, new, repeats):
    run = lambda n: generate_ids(params, cfg, prompts, max_new_tokens=n, strategy=Greedy())  # noqa: E731
    one = best_time(lambda: run(1), repeats, warmup=1)
    full = best_time(lambda: run(new), repeats, warmup=1)
    produced = run(new)
    assert all(len(r) == new for r in produced), [len(r) for r in produced]
    return one, full


def time_hf(model, prompts, new, repeats):
    torch = setup_torch()
    ids = torch.as_tensor(np.asarray(prompts), dtype=torch.long)
    mask = torch.ones_like(ids)

    def run(n):
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, use_cache=True, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + n, out.shape
        return out

    one = best_time(lambda: run(1), repeats, warmup=1)
    full = best_time(lambda: run(new), repeats, warmup=1)
    return one, full


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench-135m")
    p.add_argument("--prompt", type=int, default=64, help="prompt length")
    p.add_argument("--new", type=int, default=128, help="new tokens per row")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--bw-gib", type=float, default=1.0, help="array size for the bandwidth measurement")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    args = p.parse_args()

    emit("machine", **machine())
    bw = memory_bandwidth(args.bw_gib)
    emit("memory_bandwidth", **bw)
    rows = []
    rng = np.random.default_rng(0)
    for dtype in args.dtypes:
        cfg = LlamaConfig.from_preset(args.preset, dtype=dtype, param_dtype=dtype)
        params = init_params(cfg, jax.random.PRNGKey(0))
        per_layer = unstack_layers(params, fuse=True)  # the Sampler's layout on a CPU
        hf = None if args.no_hf else hf_model(cfg, dtype)
        itemsize = jnp.dtype(dtype).itemsize
        for batch in args.batches:
            # Tokens >= 3 so no row starts with BOS/EOS semantics; stop ids are off on both sides anyway.
            prompts = rng.integers(3, cfg.vocab_size, (batch, args.prompt)).tolist()
            context = args.prompt + args.new / 2  # mean context over the decode steps
            roof = batch * bw["best_gbps"] * 1e9 / step_bytes(cfg, batch, context, itemsize)
            results = {}
            impls = ["llama_jax", "llama_jax+per_layer"] + ([] if hf is None else ["transformers"])
            for impl in impls:
                if impl == "transformers":
                    one, full = time_hf(hf, prompts, args.new, args.repeats)
                else:
                    p = per_layer if impl == "llama_jax+per_layer" else params
                    one, full = time_ours(cfg, p, prompts, args.new, args.repeats)
                step_s = (full - one) / (args.new - 1)
                tps = batch / step_s
                results[impl] = tps
                rows.append(emit("decode", impl=impl, preset=args.preset, dtype=dtype, batch=batch,
                                 prompt=args.prompt, new=args.new, step_ms=step_s * 1e3, tokens_per_s=tps,
                                 end_to_end_tokens_per_s=batch * args.new / full, prefill_plus_1_s=one,
                                 roofline_tokens_per_s=roof, frac_of_roofline=tps / roof))
            if "transformers" in results:
                for row in rows[-len(results):]:
                    row["speedup"] = round(results[row["impl"]] / results["transformers"], 3)
                best = max(v for k, v in results.items() if k != "transformers")
                emit("decode_speedup", dtype=dtype, batch=batch, speedup=best / results["transformers"], bar=1.5,
                     frac_of_roofline=best / roof)
        del params, per_layer, hf
    print_table(f"decode ({args.preset}, prompt {args.prompt}, {args.new} new tokens; read bandwidth "
                f"{bw['best_gbps']:.1f} GB/s)", rows,
                ["impl", "dtype", "batch", "step_ms", "tokens_per_s", "end_to_end_tokens_per_s",
                 "roofline_tokens_per_s", "frac_of_roofline", "speedup"])


if __name__ == "__main__":
    main()
