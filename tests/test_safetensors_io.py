"""The safetensors reader over the library: rows in chunks, bfloat16, the library's header checks, and a
1-row read of a big tensor that stays small. (The writer, and the reader on converted checkpoints, are
tested in test_convert.py.)"""

import json
import os
import struct
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

from llama_jax.errors import SafetensorsError
from llama_jax.io import safetensors_io
from llama_jax.io.safetensors_io import SafetensorsFile, write_arrays


def write_header(path, header, data_bytes):
    """A safetensors file with `header` and `data_bytes` of zeros (a sparse file: no disk, no memory)."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + data_bytes)


def test_rows_in_chunks_bfloat16_scalars_and_empty_ranges(tmp_path, monkeypatch):
    path = str(tmp_path / "x.safetensors")
    a = np.arange(7 * 5, dtype=np.float32).reshape(7, 5)
    b = (np.arange(9 * 3) / 7).astype(ml_dtypes.bfloat16).reshape(9, 3)
    write_arrays(path, [("a", a), ("b", b), ("s", np.array(2.5, np.float16)), ("z", np.zeros((4, 0), np.int8))])
    monkeypatch.setattr(safetensors_io, "_READ_CHUNK", 2 * 5 * 4)  # two rows of `a` a chunk
    f = SafetensorsFile(path)
    np.testing.assert_array_equal(f.read("a"), a)
    np.testing.assert_array_equal(f.read_rows("a", 1, 6), a[1:6])
    assert f.read("b").dtype == ml_dtypes.bfloat16 and f.read("b").tobytes() == b.tobytes()
    assert f.read_rows("b", 8, 9).tobytes() == b[8:9].tobytes()
    s = f.read("s")
    assert s.shape == () and s.dtype == np.float16 and s == 2.5
    assert f.read_rows("a", 7, 7).shape == (0, 5) and f.read("z").shape == (4, 0)
    with pytest.raises(SafetensorsError, match=r"rows \[5, 8\) of tensor 'a' asked for; it has 7 rows"):
        f.read_rows("a", 5, 8)


@pytest.mark.parametrize("offsets, data, message", [
    ([[0, 8], [16, 24]], 24, "invalid offset for tensor `b`"),  # a gap
    ([[0, 8], [8, 16]], 20, "not fully covered"),  # bytes after the last tensor
])
def test_the_library_checks_the_offsets(tmp_path, offsets, data, message):
    path = tmp_path / "x.safetensors"
    write_header(path, {n: {"dtype": "F32", "shape": [2], "data_offsets": o} for n, o in zip("ab", offsets)}, data)
    with pytest.raises(SafetensorsError, match=message) as e:
        SafetensorsFile(str(path))
    assert str(e.value).startswith(f"{path}: not a valid safetensors file")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset")
def test_one_row_of_a_big_tensor_reads_only_that_row(tmp_path):
    """Peak resident memory of a fresh process: 1 row of a 1 GiB tensor costs ~nothing; a whole 64 MiB tensor
    costs 64 MiB plus at most two read chunks (not the map and the copy of the whole tensor)."""
    path = tmp_path / "big.safetensors"
    rows, cols = 1 << 14, 1 << 15  # bfloat16: 1 GiB
    write_header(path, {"big": {"dtype": "BF16", "shape": [rows, cols], "data_offsets": [0, 2 * rows * cols]},
                        "mid": {"dtype": "F32", "shape": [1 << 12, 1 << 12],
                                "data_offsets": [2 * rows * cols, 2 * rows * cols + (64 << 20)]}},
                 2 * rows * cols + (64 << 20))
    script = textwrap.dedent(f"""
        from llama_jax.io.safetensors_io import SafetensorsFile
        def peak_mib():  # VmHWM, the peak resident size since the last reset
            status = dict(line.split(":", 1) for line in open("/proc/self/status"))
            return int(status["VmHWM"].split()[0]) / 1024
        def reset_peak():
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return peak_mib()
        f = SafetensorsFile({str(path)!r})
        before = reset_peak()
        row = f.read_rows("big", 1234, 1235)
        assert row.shape == (1, {cols}) and not row.any()
        one_row = peak_mib() - before
        before = reset_peak()
        mid = f.read("mid")
        print(one_row, peak_mib() - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    one_row, whole = map(float, out.split())
    assert one_row < 16, out
    assert 60 < whole < 64 + 2 * 8 + 8, out
