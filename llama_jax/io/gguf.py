"""GGUF files (llama.cpp, Ollama, LM Studio) as a tensor Source: `python -m llama_jax.convert model.gguf DST` and
`llama_jax.load("model.gguf")` for `general.architecture = llama`.

The container is parsed by the `gguf` package (from llama.cpp): GGUFReader memory-maps the file but only its
header is touched; each tensor's bytes are read with one pread when asked for and dequantized by
`gguf.quants.dequantize` (F32/F16/BF16 and the Q*_0/Q*_1/Q*_K families), so one tensor at a time is in memory.
Tensors are named here in the spec's Hugging Face spelling (GGUF_NAMES maps spec paths to llama.cpp's names);
llama.cpp's converter stores attn_q/attn_k rows in Meta's interleaved rotary order (its
`LlamaModel.permute`, the same reordering as spec.hf_to_meta_rotary), undone on read. The config comes from the
`llama.*` metadata (gguf_config.py), the tokenizer from the `tokenizer.*` metadata (gguf_vocab.py).
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, Tuple

import numpy as np

from llama_jax.errors import ConversionError
from llama_jax.io.source import Source
from llama_jax.model import spec

MAGIC = b"GGUF"

# spec path -> llama.cpp tensor name ("{i}": the layer). Export writes these; import reads them.
GGUF_NAMES: Dict[str, str] = {
    "embed/embedding": "token_embd.weight",
    "layers/attn/q": "blk.{i}.attn_q.weight",
    "layers/attn/k": "blk.{i}.attn_k.weight",
    "layers/attn/v": "blk.{i}.attn_v.weight",
    "layers/attn/o": "blk.{i}.attn_output.weight",
    "layers/mlp/gate": "blk.{i}.ffn_gate.weight",
    "layers/mlp/up": "blk.{i}.ffn_up.weight",
    "layers/mlp/down": "blk.{i}.ffn_down.weight",
    "layers/attn_norm/scale": "blk.{i}.attn_norm.weight",
    "layers/mlp_norm/scale": "blk.{i}.ffn_norm.weight",
    "final_norm/scale": "output_norm.weight",
    "lm_head": "output.weight",
}
assert set(GGUF_NAMES) == set(spec.BY_NAME), "every spec tensor needs a GGUF name"
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1 rope scaling as per-frequency factors (read into the config)

# Tensor types read (gguf.quants.dequantize does the quantized ones; F32/F16 are plain arrays).
READABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def is_gguf(path: str) -> bool:
    """A file named *.gguf (a wrong one is refused by GGUFSource with its reason) or any file starting with the
    GGUF magic (Ollama keeps its models as blobs named sha256-...)."""
    if not os.path.isfile(path):
        return False
    if path.endswith(".gguf"):
        return True
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def gguf_name(p: spec.Param, layer=None) -> str:
    return GGUF_NAMES[p.name].format(i=layer)


def open_reader(path: str):
    """gguf.GGUFReader over `path`; ConversionError (one line) for a file that is not a whole GGUF."""
    import gguf

    with open(path, "rb") as f:
        head = f.read(4)
    if head != MAGIC:
        raise ConversionError(f"{path}: not a GGUF file: it starts with {head!r}, expected the magic {MAGIC!r}")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, MemoryError) as e:
        raise ConversionError(f"{path}: truncated or malformed GGUF file ({' '.join(str(e).split())[:200]})") from None


def metadata(reader) -> Dict[str, object]:
    """{key: value} of the file's metadata: str, int, float, bool, or a list (numeric arrays as numpy)."""
    from gguf import GGUFValueType

    out: Dict[str, object] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or not field.types:
            continue
        if field.types[0] == GGUFValueType.ARRAY and field.types[-1] != GGUFValueType.STRING:
            parts = [field.parts[i] for i in field.data]
            out[key] = np.concatenate(parts) if parts else np.zeros(0)
        else:
            out[key] = field.contents()
    return out


class GGUFSource(Source):
    """One GGUF file. `directory` is the file's path (messages name it)."""

    kind = "GGUF"

    def __init__(self, path: str):
        from llama_jax.io.gguf_config import config_from_metadata

        self.directory = self.path = path
        reader = open_reader(path)
        self.meta = metadata(reader)
        self._tensors = {t.name: t for t in reader.tensors}
        self._check_extent(os.path.getsize(path))
        self._check_types()
        rope_freqs = self._read_gguf(ROPE_FREQS) if ROPE_FREQS in self._tensors else None
        self.config = config_from_metadata(self.meta, path, set(self._tensors), rope_freqs)
        self._hf: Dict[str, Tuple[str, spec.Param, object]] = {}  # HF name -> (GGUF name, param, layer)
        for name in self._tensors:
            if name == ROPE_FREQS:
                continue
            hit = _match_gguf(name)
            hf = hit[0].hf_name(hit[1]) if hit else name  # an unknown name is reported by check_source
            self._hf[hf] = (name, *(hit or (None, None)))

    def copy_tokenizer(self, dst_dir: str) -> List[str]:
        """tokenizer.model or tokenizer.json + tokenizer_config.json rebuilt from the metadata."""
        from llama_jax.io.gguf_vocab import write_tokenizer

        return write_tokenizer(self.meta, dst_dir, self.path)

    def _check_extent(self, size: int) -> None:
        for t in self._tensors.values():
            if t.data_offset + t.n_bytes > size:
                raise ConversionError(f"{self.path}: truncated: tensor {t.name!r} ends at byte "
                                      f"{t.data_offset + t.n_bytes}, but the file has {size} bytes")

    def _check_types(self) -> None:
        for t in self._tensors.values():
            if t.tensor_type.name not in READABLE:
                raise ConversionError(f"{self.path}: tensor {t.name!r} has type {t.tensor_type.name}, which llama_jax "
                                      f"does not read; expected one of {', '.join(READABLE)}")

    # ---- Source
    def names(self) -> List[str]:
        return list(self._hf)

    def shape(self, name):
        return tuple(int(d) for d in reversed(self._tensors[self._hf[name][0]].shape.tolist()))

    def dtype(self, name):
        kind = self._tensors[self._hf[name][0]].tensor_type.name
        return np.dtype({"F16": "float16", "BF16": "bfloat16"}.get(kind, "float32"))  # quantized: float32

    def where(self, name):
        return f"{self.path} (tensor {self._hf[name][0]!r})" if name in self._hf else self.path

    def read(self, name):
        gname, p, _ = self._hf[name]
        w = self._read_gguf(gname)
        if p is not None and p.rotary_heads:  # llama.cpp's permute -> Hugging Face's rotary order
            w = spec.meta_to_hf_rotary(w, getattr(self.config, p.rotary_heads))
        return w

    def read_rows(self, name, start, stop):
        gname, p, _ = self._hf[name]
        if p is not None and p.rotary_heads:
            return self.read(name)[start:stop]
        return self._read_gguf(gname, start, stop)

    def _read_gguf(self, gname: str, start: int = 0, stop=None) -> np.ndarray:
        """Rows [start, stop) of a tensor as float32 (or its float16/bfloat16), shape [rows, cols] (or [n])."""
        t = self._tensors[gname]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        rows = shape[0] if len(shape) > 1 else 1
        stop = rows if stop is None else min(stop, rows)
        row_bytes = t.n_bytes // rows
        with open(self.path, "rb") as f:
            raw = os.pread(f.fileno(), row_bytes * (stop - start), t.data_offset + row_bytes * start)
        return dequantize(np.frombuffer(raw, np.uint8), t.tensor_type, (stop - start,) + shape[1:] if len(shape) > 1
                          else shape)


def dequantize(raw: np.ndarray, qtype, shape) -> np.ndarray:
    """Bytes of whole rows of a `qtype` tensor -> the array of `shape` (F16/BF16 kept, the rest float32)."""
    import gguf

    name = qtype.name
    if name in ("F32", "F16"):
        return raw.view(np.float32 if name == "F32" else np.float16).reshape(shape)
    if name == "BF16":
        return raw.view(np.uint16).reshape(shape).view(_bfloat16())
    row_bytes = raw.size // max(1, int(np.prod(shape[:-1])))
    return gguf.quants.dequantize(raw.reshape(-1, row_bytes), qtype).reshape(shape)


def _bfloat16():
    import ml_dtypes

    return ml_dtypes.bfloat16


_PATTERNS = [(re.compile("^" + re.escape(t).replace(re.escape("{i}"), r"(\d+)") + "$"), spec.BY_NAME[path])
             for path, t in GGUF_NAMES.items()]


def _match_gguf(name: str):
    """(Param, layer or None) of a llama.cpp tensor name, or None."""
    for pattern, p in _PATTERNS:
        m = pattern.match(name)
        if m:
            return p, (int(m.group(1)) if m.groups() else None)
    return None
