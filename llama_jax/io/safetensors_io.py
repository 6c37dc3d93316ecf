"""A lazy safetensors reader and a streaming writer, in numpy (bfloat16 via ml_dtypes), no torch.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw tensor bytes. Reading uses positioned reads (not mmap) so only the tensor being converted is
resident; writing declares every tensor up front and then streams each one's bytes, in row blocks if need be,
so neither side ever holds more than one tensor.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import ml_dtypes
import numpy as np
from llama_jax.errors import SafetensorsError  # noqa: F401 (also re-exported)

DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
          "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(bool)}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


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
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self.tensors: Dict[str, Tuple[np.dtype, Tuple[int, ...], int, int]] = {}
        end_max = 0
        for name, info in header.items():
            if info.get("dtype") not in DTYPES:
                raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
            dtype, shape = DTYPES[info["dtype"]], tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
            if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
                raise SafetensorsError(f"{path}: tensor {name!r} of shape {shape} {info['dtype']} has "
                                       f"{end - begin} bytes of data, expected {dtype.itemsize * int(np.prod(shape))}")
            self.tensors[name] = (dtype, shape, begin, end)
            end_max = max(end_max, end)
        if self._data_start + end_max > size:
            raise SafetensorsError(f"{path}: file is truncated: its header needs {self._data_start + end_max} "
                                   f"bytes, the file has {size}")

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.tensors[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self.tensors[name][0]

    def read(self, name: str) -> np.ndarray:
        """The whole tensor as a fresh numpy array."""
        return self.read_rows(name, 0, self.shape(name)[0] if self.shape(name) else 1)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) along axis 0 (contiguous on disk, so only those bytes are read)."""
        dtype, shape, begin, _ = self.tensors[name]
        if not shape:
            return self._pread(begin, dtype.itemsize).view(dtype).reshape(())
        row = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        buf = self._pread(begin + start * row, (stop - start) * row)
        return buf.view(dtype).reshape((stop - start,) + shape[1:])

    def _pread(self, offset: int, nbytes: int) -> np.ndarray:
        out = np.empty(nbytes, np.uint8)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + offset)
            got = f.readinto(memoryview(out))
        if got != nbytes:
            raise SafetensorsError(f"{self.path}: file is truncated (short read of {got} of {nbytes} bytes)")
        return out


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
        self._f = open(path, "wb")
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
