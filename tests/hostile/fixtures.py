"""Small builders shared by the hostile cases (files are made fresh under each test's tmp folder)."""

import json
from pathlib import Path


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def tiny_hf_dir(directory: Path, **config_overrides) -> Path:
    """A Hugging Face directory of a tiny Llama (2 layers, hidden 64, zero weights): config.json +
    model.safetensors. `config_overrides` change config.json only (the tensors stay)."""
    from llama_jax.config import LlamaConfig
    from llama_jax.io.safetensors_io import write_arrays
    from llama_jax.model import spec
    import numpy as np

    config = LlamaConfig.from_preset("tiny", num_layers=2)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "config.json", {**config.to_hf_dict(), **config_overrides})
    arrays = [(p.hf_name(i), np.zeros(p.hf_shape(config), np.float32)) for p in spec.params(config)
              for i in (range(config.num_layers) if p.stacked else (None,))]
    write_arrays(str(directory / "model.safetensors"), arrays)
    return directory


def safetensors_file(path: Path, header, data_bytes: int = 64) -> Path:
    """A safetensors file with any `header` (a dict, or anything JSON) and `data_bytes` zero bytes after it."""
    import struct

    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_bytes))
    return path
