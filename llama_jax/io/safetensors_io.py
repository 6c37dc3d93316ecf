"""A lazy safetensors reader over the `safetensors` library, and our own streaming writer; numpy
(bfloat16 via ml_dtypes), no torch.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw tensor bytes. Reading goes through `safetensors.safe_open(framework="numpy").get_slice`, which
copies out only the rows asked for and checks the header on every open (offsets from 0, no gap, no overlap,
the data covering the file exactly); our own reading of the header comes first only so that each error names
the file, tensor and sizes. Writing stays ours: the library writes a dict of whole in-memory arrays, while
conversion declares every tensor up front and then streams each one's bytes, in row blocks if need be, so
neither side ever holds more than one tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import ml_dtypes  # also registers the name "bfloat16" with numpy, which the library's BF16 reads rely on
import numpy as np
import safetensors
from llama_jax.errors import SafetensorsError  # noqa: F401 (also re-exported)
from llama_jax.io import paths

DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
          "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(bool)}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
# Rows are copied out of the library's memory map at most this many bytes at a time, each chunk through a
# handle of its own. A mapped page counts toward the process's resident size until its map is closed, so one
# handle over a whole tensor would briefly cost the tensor twice (map + copy), and a handle kept open for the
# file would grow with everything converted. (The library's other backend, "pread", reads the whole tensor
# before slicing it, so a 1-row read would not stay small.) 8 MiB chunks read as fast as plain positioned
# reads here; an open costs well under a millisecond.
_READ_CHUNK = 8 << 20


class SafetensorsFile:
    """Header of one safetensors file, read eagerly; tensor data read on demand with `read` / `read_rows`."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise SafetensorsError(f"{path}: file is truncated ({size} bytes; no safetensors header)")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or 8 + n > size:
                    raise SafetensorsError(f"{path}: file is truncated or not safetensors (header says {n} "
                                           f"header bytes, the file has {size} bytes)")
                header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{path}: not a safetensors file (bad JSON header: {e})") from None
        self._data_start = 8 + n
        self.metadata, self.tensors = check_header(path, header, self._data_start, size - self._data_start)
        with self._open():  # the library's own checks of the header, for what the ones above do not cover
            pass

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.tensors[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self.tensors[name][0]

    def read(self, name: str) -> np.ndarray:
        """The whole tensor as a fresh numpy array."""
        return self.read_rows(name, 0, self.shape(name)[0] if self.shape(name) else 1)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) along axis 0 -> [stop - start, *shape[1:]] (a scalar tensor: the scalar). Rows
        are contiguous on disk: only their bytes are read, at most _READ_CHUNK of them mapped at a time."""
        dtype, shape, _, _ = self.tensors[name]
        if not shape:
            return self._read(name, None)
        if not 0 <= start <= stop <= shape[0]:
            raise SafetensorsError(f"{self.path}: rows [{start}, {stop}) of tensor {name!r} asked for; it has "
                                   f"{shape[0]} rows (shape {shape})")
        if start == stop or 0 in shape:  # nothing to read (and the library refuses empty slices)
            return np.empty((stop - start,) + shape[1:], dtype)
        step = max(1, _READ_CHUNK // (dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))))
        if stop - start <= step:
            return self._read(name, slice(start, stop))
        out = np.empty((stop - start,) + shape[1:], dtype)
        for s in range(start, stop, step):
            e = min(s + step, stop)
            out[s - start:e - start] = self._read(name, slice(s, e))
        return out

    def _read(self, name: str, rows: Optional[slice]) -> np.ndarray:
        """Tensor `name` (rows=None) or its `rows`, through one short-lived library handle: its map closes on
        return. BF16 arrives as ml_dtypes.bfloat16: the library asks numpy for dtype("bfloat16")."""
        with self._open() as f:
            try:
                return f.get_tensor(name) if rows is None else f.get_slice(name)[rows]
            except safetensors.SafetensorError as e:
                raise SafetensorsError(f"{self.path}: cannot read tensor {name!r} ({e})") from None

    def _open(self):
        """A `safe_open` handle; the library's refusal (its header checks) becomes a SafetensorsError."""
        try:
            return safetensors.safe_open(self.path, framework="numpy")
        except (safetensors.SafetensorError, OSError) as e:
            raise SafetensorsError(f"{self.path}: not a valid safetensors file ({e})") from None


def _int_list(value, length=None) -> bool:
    return (isinstance(value, list) and (length is None or len(value) == length)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


def check_header(path: str, header, data_start: int, data_size: int):
    """(metadata, {name: (dtype, shape, begin, end)}) of a parsed header, after checking every entry: an object
    with a known dtype, a shape and two data_offsets of non-negative integers, its byte count equal to shape x
    dtype, inside the `data_size` bytes after the header (which ends at byte `data_start`), and no two tensors sharing a byte. A SafetensorsError
    names the file and the tensor otherwise (a negative offset would read header bytes as weights; overlapping
    ones would alias two tensors)."""
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: not a safetensors file (its header is a JSON {type(header).__name__}, "
                               "expected an object of tensors)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SafetensorsError(f"{path}: __metadata__ is a {type(metadata).__name__}, expected an object")
    tensors: Dict[str, Tuple[np.dtype, Tuple[int, ...], int, int]] = {}
    for name, info in header.items():
        if not isinstance(info, dict):
            raise SafetensorsError(f"{path}: tensor {name!r} has header entry {info!r:.80}, expected an object "
                                   "with dtype, shape and data_offsets")
        if not isinstance(info.get("dtype"), str) or info["dtype"] not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        if not _int_list(info.get("shape")):
            raise SafetensorsError(f"{path}: tensor {name!r} has shape {info.get('shape')!r:.80}, expected a "
                                   "list of non-negative integers")
        if not _int_list(info.get("data_offsets"), 2) or info["data_offsets"][0] > info["data_offsets"][1]:
            raise SafetensorsError(f"{path}: tensor {name!r} has data_offsets {info.get('data_offsets')!r:.80}, "
                                   "expected [begin, end] with 0 <= begin <= end")
        dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
        begin, end = info["data_offsets"]
        nbytes = dtype.itemsize * math.prod(shape)
        if end - begin != nbytes:
            raise SafetensorsError(f"{path}: tensor {name!r} of shape {shape} {info['dtype']} has "
                                   f"{end - begin} bytes of data, expected {nbytes}")
        if end > data_size:
            raise SafetensorsError(f"{path}: file is truncated: tensor {name!r} (data_offsets [{begin}, {end}]) "
                                   f"needs {data_start + end} bytes, the file has {data_start + data_size}")
        tensors[name] = (dtype, shape, begin, end)
    last_end, last = 0, None
    for name, (_, _, begin, end) in sorted(tensors.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin < last_end:
            raise SafetensorsError(f"{path}: tensor {name!r} (bytes [{begin}, {end}]) overlaps tensor {last!r} "
                                   f"(which ends at {last_end})")
        if end > begin:
            last_end, last = end, name
    return metadata, tensors


class SafetensorsWriter:
    """Streams tensors into one safetensors file. All (name, dtype, shape) are declared up front (the header
    comes first); then `write(name, block)` appends each tensor's rows in order, in one or more blocks."""

    def __init__(self, path: str, specs: Sequence[Tuple[str, np.dtype, Sequence[int]]],
                 metadata: Optional[Dict[str, str]] = None):
        self.path = path
        header, offset = {}, 0
        self._order: List[Tuple[str, int]] = []
        for name, dtype, shape in specs:
            dtype = np.dtype(dtype)
            nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": [int(s) for s in shape],
                            "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, nbytes))
            offset += nbytes
        header["__metadata__"] = dict(metadata or {"format": "pt"})
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self._dtypes = {name: np.dtype(dtype) for name, dtype, _ in specs}
        self._f = paths.open(path, "wb")  # a gs:// upload streams in blocks (gcsfs), appears whole on close
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._index, self._written = 0, 0

    def write(self, name: str, block: np.ndarray) -> None:
        if self._index >= len(self._order) or self._order[self._index][0] != name:
            expected = self._order[self._index][0] if self._index < len(self._order) else "nothing"
            raise SafetensorsError(f"{self.path}: wrote {name!r} out of order; expected {expected!r}")
        data = np.ascontiguousarray(block, dtype=self._dtypes[name]).tobytes()
        self._f.write(data)
        self._written += len(data)
        total = self._order[self._index][1]
        if self._written > total:
            raise SafetensorsError(f"{self.path}: tensor {name!r} got {self._written} bytes, expected {total}")
        if self._written == total:
            self._index, self._written = self._index + 1, 0

    def close(self) -> None:
        self._f.close()
        if self._index != len(self._order):
            raise SafetensorsError(f"{self.path}: closed before tensor {self._order[self._index][0]!r} was written")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self._f.close()


def write_arrays(path: str, arrays: Iterable[Tuple[str, np.ndarray]]) -> None:
    """Small helper: write (name, array) pairs (arrays already in memory) as one safetensors file."""
    arrays = list(arrays)
    with SafetensorsWriter(path, [(n, a.dtype, a.shape) for n, a in arrays]) as w:
        for n, a in arrays:
            w.write(n, a)
