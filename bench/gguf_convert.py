"""GGUF conversion speed (MB/s of GGUF file) and peak resident memory, both ways.

    python bench/gguf_convert.py [--sizes 0.1 0.5] [--types F16 Q4_K] [--export q8_0] [--workdir DIR]

For each size and tensor type, writes a random Llama GGUF (the shapes of bench/convert_memory.py; F16 values or
random Q4_K blocks, written tensor by tensor), then measures `python -m llama_jax.convert X.gguf DST` (import:
read, dequantize, un-permute, write Orbax) and `--to-gguf DST OUT.gguf --type EXPORT` (export: read, permute,
quantize, write) as subprocesses whose peak RSS comes from wait4(). A tiny conversion gives the baseline (the
interpreter, jax, Orbax, tensorstore). Prints one JSON line per measurement, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from convert_memory import convert_measured, synthetic_config  # noqa: E402


def write_synthetic_gguf(config, path: str, kind: str, seed: int = 0) -> int:
    """A random llama GGUF of `config` with 2-D tensors in `kind` (F16, or Q4_K as random blocks with sane
    scales), one tensor in memory at a time. Returns the file's size."""
    import gguf
    import numpy as np

    from llama_jax.io.gguf import gguf_name
    from llama_jax.io.gguf_config import metadata_of
    from llama_jax.model import spec

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "llama")
    for key, (value, how) in metadata_of(config, 1 if kind == "F16" else 15).items():
        getattr(w, f"add_{how}")(key, value)
    tensors = [(gguf_name(p, i), p.hf_shape(config)) for p in spec.params(config)
               for i in (range(config.num_layers) if p.stacked else (None,))]
    types = {n: ("F32" if len(s) == 1 else kind) for n, s in tensors}
    block = {n: gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]] for n, t in types.items()}
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) // block[name][0] * block[name][1]
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, gguf.GGMLQuantizationType[types[name]])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape in tensors:
        t = types[name]
        if t == "F32":
            data = np.ones(shape, np.float32)
        elif t == "F16":
            data = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)
        else:  # Q4_K: 144-byte blocks of 256 values, d and dmin (the first two f16) small
            data = rng.integers(0, 256, (shape[0], shape[1] // 256, 144), dtype=np.uint8)
            data[:, :, :4] = rng.uniform(1e-4, 1e-3, (shape[0], shape[1] // 256, 2)).astype(np.float16).view(np.uint8)
        w.write_tensor_data(data)
    w.close()
    return os.path.getsize(path)


def _child(*args) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *map(str, args)], env=env, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _step(argv) -> None:
    """Subprocess side: `_write GB|tiny KIND PATH` writes a synthetic GGUF."""
    from llama_jax.config import LlamaConfig

    size, kind, path = argv
    config = LlamaConfig.from_preset("tiny") if size == "tiny" else synthetic_config(int(float(size) * 1e9))
    print(json.dumps({"bytes": write_synthetic_gguf(config, path, kind), "layers": config.num_layers}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.1, 0.5], help="model sizes, GB of bfloat16")
    parser.add_argument("--types", nargs="+", default=["F16", "Q4_K"], choices=["F16", "Q4_K"])
    parser.add_argument("--export", default="q8_0", help="--type of the export measured (none: skip)")
    parser.add_argument("--workdir", default=None, help="where to write files (default: a temp dir)")
    args = parser.parse_args(argv)
    subprocess.run([sys.executable, "-c", "import common; common.emit('machine', **common.machine())"],
                   cwd=HERE, check=True)
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gguf_convert_", dir=args.workdir)
    rows = []
    try:
        _child("_write", "tiny", "F16", os.path.join(work, "tiny.gguf"))
        _, baseline = convert_measured(os.path.join(work, "tiny.gguf"), os.path.join(work, "tiny_dst"))
        for gb in args.sizes:
            for kind in args.types:
                src, dst = os.path.join(work, f"{gb}_{kind}.gguf"), os.path.join(work, f"dst_{gb}_{kind}")
                made = _child("_write", gb, kind, src)
                seconds, peak = convert_measured(src, dst)
                mb = made["bytes"] / 1e6
                row = {"bench": "gguf_convert", "target_gb": gb, "type": kind, "gguf_mb": round(mb, 1),
                       "layers": made["layers"], "import_seconds": round(seconds, 2),
                       "import_mb_per_s": round(mb / seconds, 1), "import_peak_rss_mib": round(peak),
                       "baseline_rss_mib": round(baseline)}
                if args.export != "none":
                    out = os.path.join(work, "out.gguf")
                    seconds, peak = convert_measured(dst, out, "--to-gguf", "--type", args.export)
                    out_mb = os.path.getsize(out) / 1e6
                    row.update(export_type=args.export, export_mb=round(out_mb, 1), export_seconds=round(seconds, 2),
                               export_mb_per_s=round(out_mb / seconds, 1), export_peak_rss_mib=round(peak))
                    os.remove(out)
                print(json.dumps(row), flush=True)
                rows.append(row)
                os.remove(src)
                shutil.rmtree(dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'GGUF MB':>8} {'type':>5} {'import MB/s':>11} {'peak MiB':>8} {'export MB/s':>11} {'peak MiB':>8}")
    for r in rows:
        print(f"{r['gguf_mb']:>8} {r['type']:>5} {r['import_mb_per_s']:>11} {r['import_peak_rss_mib']:>8} "
              f"{r.get('export_mb_per_s', '-'):>11} {r.get('export_peak_rss_mib', '-'):>8}")
    print(f"(baseline: converting a tiny GGUF peaks at {round(baseline)} MiB)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_write":
        _step(sys.argv[2:])
    else:
        main()
