"""Builders for the checkpoint and training cases: a tiny converted llama_jax checkpoint (the converter's own
write path, from a random safetensors directory), its chunk files, and byte flips."""

import atexit
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

_BUILT = {}


def tiny_config():
    from llama_jax import LlamaConfig
    return LlamaConfig.from_preset("tiny", vocab_size=128, num_layers=2, hidden_size=64, intermediate_size=128,
                                   num_heads=4, num_kv_heads=2)


def hf_dir(path: Path, seed: int = 0) -> Path:
    """A Hugging Face directory (config.json + model.safetensors) of random float32 tensors."""
    from safetensors.numpy import save_file

    from llama_jax.model import spec

    config, rng = tiny_config(), np.random.RandomState(seed)
    tensors = {}
    for p in spec.params(config):
        for layer in (range(config.num_layers) if p.stacked else (None,)):
            tensors[p.hf_name(layer)] = rng.randn(*p.hf_shape(config)).astype(np.float32)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    return path


def checkpoint(tmp: Path, name: str = "ckpt") -> Path:
    """A copy of a converted tiny checkpoint under `tmp` (converted once per test session)."""
    if "ckpt" not in _BUILT:
        from llama_jax.io.convert import convert_to_llama_jax

        root = Path(tempfile.mkdtemp(prefix="llama_jax-hostile-ckpt-"))
        atexit.register(shutil.rmtree, root, True)
        convert_to_llama_jax(str(hf_dir(root / "hf")), str(root / "ckpt"), progress=False)
        _BUILT["ckpt"] = root / "ckpt"
    dst = tmp / name
    shutil.copytree(_BUILT["ckpt"], dst)
    return dst


def chunks(ckpt: Path, leaf: str) -> list:
    """The chunk files of one leaf ("lm_head", "layers.attn.q") of a converted (non-OCDBT) checkpoint."""
    return sorted(f for f in glob.glob(str(ckpt / "params" / leaf / "*")) if not os.path.basename(f).startswith("."))


def flip(path, at: float = 0.5, n: int = 8) -> None:
    """Invert `n` bytes of a file from the fraction `at` of its length."""
    data = bytearray(Path(path).read_bytes())
    start = min(int(len(data) * at), len(data) - n)
    for i in range(start, start + n):
        data[i] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def drop_checksums(ckpt: Path) -> None:
    """Make `ckpt` look written before checksums were recorded."""
    meta = json.loads((ckpt / "llama_jax.json").read_text())
    meta.pop("checksums", None)
    (ckpt / "llama_jax.json").write_text(json.dumps(meta))
