"""GPU (or TPU) check, a few minutes: train-step MFU of a ~1B Llama (the llama3.2-1b shape) in bfloat16
against the chip's peak, and decode bandwidth utilisation, with the chip and the JAX version recorded.

    python bench/gpu.py                    # on a machine with one accelerator
    python bench/gpu.py --quick            # tiny shapes: checks the script itself (runs on CPU too)

Train: bf16 compute, float32 master weights and AdamW state (the usual mixed precision), batch x seq tokens,
the fastest of `--steps` steps after two warm-up steps. MFU = tokens/s x `flops.train_flops_per_token` / the
chip's dense bf16 peak (vendor table: `flops.PEAK_FLOPS`, PCIe H100 corrected below). If the step does not fit,
it retries with rematerialisation (the record says which policy ran).
Decode: greedy `sampling.generate_ids`, bf16 weights, batch 1 and 8; per-step time = (time for N tokens - time
for 1) / (N - 1); utilisation = bytes read per step (weights + KV cache) / step time / the chip's HBM bandwidth
(vendor table) and / the copy bandwidth measured here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Unlike the CPU benchmarks, let JAX pick the accelerator.
os.environ.setdefault("JAX_PLATFORMS", "")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402,F401
from common import best_time, emit, print_table, versions  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llama_jax import LlamaConfig, init_params  # noqa: E402
from llama_jax.model.flops import num_params, peak_flops, train_flops_per_token  # noqa: E402

# HBM bandwidth, bytes/s, from the vendors' data sheets (SXM parts unless the name says PCIe).
PEAK_BANDWIDTH = {"h200": 4.8e12, "h100 pcie": 2.0e12, "h100": 3.35e12, "a100-sxm4-80gb": 2.039e12,
                  "a100-pcie-80gb": 1.935e12, "a100": 1.555e12}


def chip_bandwidth(kind: str):
    kind = kind.lower()
    for name in sorted(PEAK_BANDWIDTH, key=len, reverse=True):
        if name in kind:
            return PEAK_BANDWIDTH[name]
    return None


def chip_flops(kind: str):
    if "h100" in kind.lower() and "pcie" in kind.lower():
        return 756e12  # H100 PCIe dense bf16
    return peak_flops(kind)


def measured_copy_bandwidth(gib: float) -> float:
    """Read+write bytes/s of a jitted copy of a `gib` GiB array (x + 1 forces a real read and write)."""
    x = jnp.zeros((int(gib * 2**30) // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1)
    t = best_time(lambda: f(x).block_until_ready(), 5)
    return 2 * x.nbytes / t


def bench_train(cfg: LlamaConfig, batch: int, seq: int, steps: int, peak) -> dict:
    from llama_jax.parallel.sharding import make_mesh
    from llama_jax.training.optim import make_optimizer
    from llama_jax.training.step import init_train_state, make_train_step, state_shardings

    mesh = make_mesh(devices=jax.devices()[:1])  # every axis 1
    optimizer = make_optimizer(1e-4)
    shardings = state_shardings(cfg, optimizer, mesh)
    params = jax.device_put(init_params(cfg, jax.random.PRNGKey(0)), shardings.params)
    state = init_train_state(params, optimizer, shardings)
    del params
    step = make_train_step(cfg, optimizer, mesh, shardings=shardings)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1), dtype=np.int32))
    t0 = time.perf_counter()
    state, m = step(state, {"tokens": tokens})
    m["loss"].block_until_ready()
    first = time.perf_counter() - t0
    state, m = step(state, {"tokens": tokens})
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = step(state, {"tokens": tokens})
        m["loss"].block_until_ready()
        times.append(time.perf_counter() - t0)
    tps = batch * seq / min(times)
    flops = tps * train_flops_per_token(cfg, seq)
    return {"step_s": min(times), "first_step_s": first, "tokens_per_s": tps, "model_tflops_per_s": flops / 1e12,
            "mfu": flops / peak if peak else None, "loss": float(m["loss"])}


def bench_decode(cfg: LlamaConfig, params, batch: int, prompt: int, new: int, chip_bw, copy_bw) -> dict:
    from llama_jax.sampling import Greedy, generate_ids

    prompts = np.random.default_rng(batch).integers(3, cfg.vocab_size, (batch, prompt)).tolist()
    run = lambda n: generate_ids(params, cfg, prompts, max_new_tokens=n, strategy=Greedy())  # noqa: E731
    one = best_time(lambda: run(1), 3)
    full = best_time(lambda: run(new), 3)
    step_s = (full - one) / (new - 1)
    itemsize = jnp.dtype(cfg.param_dtype).itemsize
    weights = num_params(cfg, include_embedding=False) + (cfg.vocab_size * cfg.hidden_size
                                                          if cfg.tie_word_embeddings else 0)
    kv = 2 * cfg.num_layers * batch * (prompt + new / 2) * cfg.num_kv_heads * cfg.head_dim
    step_bytes = (weights + kv) * itemsize
    return {"step_ms": step_s * 1e3, "tokens_per_s": batch / step_s, "gbytes_per_step": step_bytes / 1e9,
            "bw_util_vs_chip": step_bytes / step_s / chip_bw if chip_bw else None,
            "bw_util_vs_measured_copy": step_bytes / step_s / copy_bw}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3.2-1b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="tiny shapes, to check the script anywhere")
    args = p.parse_args()

    dev = jax.devices()[0]
    kind = dev.device_kind
    emit("gpu_machine", platform=dev.platform, device_kind=kind, device_count=jax.device_count(), **versions())
    if dev.platform == "cpu" and not args.quick:
        emit("gpu_skipped", reason="no accelerator found (jax.devices() is CPU); run with --quick to test the script")
        return
    if args.quick:
        args.preset, args.batch, args.seq, args.steps, args.prompt, args.new = "tiny", 2, 64, 2, 8, 8
    peak, chip_bw = chip_flops(kind), chip_bandwidth(kind)
    copy_bw = measured_copy_bandwidth(0.25 if args.quick else 4.0)
    emit("gpu_limits", device_kind=kind, peak_bf16_tflops=peak / 1e12 if peak else None,
         chip_bandwidth_gbps=chip_bw / 1e9 if chip_bw else None, measured_copy_gbps=copy_bw / 1e9)

    rows = []
    base = LlamaConfig.from_preset(args.preset, dtype="bfloat16", param_dtype="float32")
    for remat in ("none", "dots_no_batch", "full"):
        cfg = base.replace(remat=remat)
        try:
            r = bench_train(cfg, args.batch, args.seq, args.steps, peak)
        except Exception as e:  # out of memory: try the next rematerialisation policy
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            emit("gpu_train_oom", remat=remat, error=str(e).splitlines()[0][:200])
            continue
        rows.append(emit("gpu_train", preset=args.preset, params_b=num_params(cfg) / 1e9, batch=args.batch,
                         seq=args.seq, remat=remat, **r))
        break

    cfg = LlamaConfig.from_preset(args.preset, dtype="bfloat16", param_dtype="bfloat16")
    params = init_params(cfg, jax.random.PRNGKey(0))
    for batch in (1, 8):
        rows.append(emit("gpu_decode", preset=args.preset, batch=batch, prompt=args.prompt, new=args.new,
                         **bench_decode(cfg, params, batch, args.prompt, args.new, chip_bw, copy_bw)))
    print_table(f"{kind} (jax {jax.__version__})", rows)


if __name__ == "__main__":
    main()
