"""Conversion time and peak resident memory for synthetic Hugging Face checkpoints of growing size.

    python bench/convert_memory.py [--sizes 0.25 1 4] [--workdir DIR] [--export]

For each size, writes a random bfloat16 HF checkpoint (sharded safetensors + index, written tensor by tensor so
this script never holds the model either), runs `python -m llama_jax.convert SRC DST` as a subprocess and
reads that subprocess's own peak RSS from wait4(). A tiny conversion first gives the baseline (the Python,
jax, Orbax and tensorstore imports); the point is that the increase over it stays flat as the checkpoint
grows; `--export` also measures the way back (`--to-hf`). Prints one JSON line per size, then a table. Spot-checks the last layer of the converted checkpoint
against the source.

This parent process stays small and imports neither numpy nor jax: Linux carries a parent's resident size at
fork into the child's ru_maxrss, so writing the synthetic checkpoint and the spot check run in subprocesses too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Llama-shaped layers of ~33.6 MB each in bfloat16; the size of the model grows with the number of layers.
BASE = dict(vocab_size=16000, hidden_size=1024, intermediate_size=4096, num_heads=8, num_kv_heads=8,
            max_position_embeddings=2048, param_dtype="bfloat16")
SHARD_BYTES = 1 << 30


def synthetic_config(target_bytes: int):
    from llama_jax.config import LlamaConfig
    from llama_jax.model.flops import num_params

    one = LlamaConfig(num_layers=1, **BASE)
    per_layer = (num_params(LlamaConfig(num_layers=2, **BASE)) - num_params(one)) * 2
    fixed = num_params(one) * 2 - per_layer
    return LlamaConfig(num_layers=max(1, round((target_bytes - fixed) / per_layer)), **BASE)


def write_synthetic_hf(config, directory: str, seed: int = 0) -> int:
    """A random HF checkpoint, one tensor in memory at a time. Returns the bytes of tensor data."""
    import numpy as np

    from llama_jax.config import dtype_of
    from llama_jax.io.convert import plan_shards
    from llama_jax.io.safetensors_io import SafetensorsWriter
    from llama_jax.model import spec

    os.makedirs(directory)
    rng = np.random.default_rng(seed)
    bf16 = dtype_of("bfloat16")
    specs = [(p.hf_name(i), bf16, p.hf_shape(config)) for p in spec.params(config)
             for i in (range(config.num_layers) if p.stacked else (None,))]
    shards = plan_shards(specs, SHARD_BYTES)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        filename = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        with SafetensorsWriter(os.path.join(directory, filename), shard) as w:
            for name, dtype, shape in shard:
                w.write(name, (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype))
                weight_map[name] = filename
                total += 2 * int(np.prod(shape))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config.to_hf_dict(), f)
    return total


def convert_measured(src: str, dst: str, *flags: str):
    """(seconds, peak RSS in MiB) of one conversion subprocess."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "llama_jax.convert", *flags, src, dst, "--no-progress",
                             "--force"], env=env, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"conversion of {src} failed ({proc.returncode}): {err[-2000:]}")
    return seconds, usage.ru_maxrss / 1024  # Linux reports KiB


def spot_check(config, src: str, dst: str) -> None:
    import numpy as np

    from llama_jax.io.checkpoint import ParamsReader
    from llama_jax.io.hf import HFSource

    name = f"model.layers.{config.num_layers - 1}.mlp.down_proj.weight"
    ours = ParamsReader(dst).read("layers.mlp.down", (config.num_layers - 1,))
    np.testing.assert_array_equal(ours, HFSource(src).read(name).T)


def _child(*args) -> dict:
    """Run one step of the benchmark in a fresh interpreter; it prints one JSON line."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *map(str, args)], env=env, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _step(argv) -> None:
    """Subprocess side: `_write GB|tiny DIR` writes a synthetic checkpoint; `_check GB SRC DST` spot-checks."""
    from llama_jax.config import LlamaConfig
    from llama_jax.model.flops import num_params

    what, size = argv[0], argv[1]
    if size == "tiny":
        config = LlamaConfig.from_preset("tiny").replace(param_dtype="bfloat16")
    else:
        config = synthetic_config(int(float(size) * 1e9))
    if what == "_write":
        print(json.dumps({"bytes": write_synthetic_hf(config, argv[2]), "layers": config.num_layers,
                          "params": num_params(config)}))
    else:
        spot_check(config, argv[2], argv[3])
        print(json.dumps({"ok": True}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.25, 1.0, 4.0], help="checkpoint sizes, GB")
    parser.add_argument("--workdir", default=None,
                        help="where to write checkpoints (created if missing; default: a temp dir)")
    parser.add_argument("--export", action="store_true", help="also measure --to-hf back to safetensors")
    args = parser.parse_args(argv)
    # the machine and library versions, from a child (this parent must not import numpy or jax)
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", "import common; common.emit('machine', **common.machine())"],
                   cwd=here, check=True)
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)  # a new DIR is fine; the run works in a temp dir inside it
    work = tempfile.mkdtemp(prefix="convert_memory_", dir=args.workdir)
    rows = []
    try:
        tiny = _child("_write", "tiny", os.path.join(work, "tiny_src"))
        _, baseline = convert_measured(os.path.join(work, "tiny_src"), os.path.join(work, "tiny_dst"))
        for gb in args.sizes:
            src, dst = os.path.join(work, f"src_{gb}"), os.path.join(work, f"dst_{gb}")
            made = _child("_write", gb, src)
            seconds, peak = convert_measured(src, dst)
            _child("_check", gb, src, dst)
            nbytes = made["bytes"]
            row = {"bench": "convert_memory", "target_gb": gb, "checkpoint_gb": round(nbytes / 1e9, 3),
                   "layers": made["layers"], "seconds": round(seconds, 1), "peak_rss_mib": round(peak),
                   "baseline_rss_mib": round(baseline), "peak_increase_mib": round(peak - baseline),
                   "checkpoint_over_increase": round(nbytes / 2**20 / max(peak - baseline, 1), 1)}
            if args.export:
                export_seconds, export_peak = convert_measured(dst, os.path.join(work, "exported"), "--to-hf")
                shutil.rmtree(os.path.join(work, "exported"))
                row.update(export_seconds=round(export_seconds, 1), export_peak_rss_mib=round(export_peak))
            print(json.dumps(row), flush=True)
            rows.append(row)
            shutil.rmtree(src)
            shutil.rmtree(dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'checkpoint GB':>13} {'layers':>6} {'seconds':>8} {'peak RSS MiB':>12} {'increase MiB':>12}")
    for r in rows:
        print(f"{r['checkpoint_gb']:>13} {r['layers']:>6} {r['seconds']:>8} {r['peak_rss_mib']:>12} "
              f"{r['peak_increase_mib']:>12}")
    print(f"(baseline: converting a {tiny['bytes'] / 1e6:.2f} MB checkpoint peaks at {round(baseline)} MiB: "
          "the interpreter + jax + Orbax + tensorstore)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("_write", "_check"):
        _step(sys.argv[1:])
    else:
        main()
