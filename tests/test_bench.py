"""Each benchmark script runs from the repository with one command (here in its small smoke form) and prints
one parseable JSON line per measurement."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMOKE = {
    "train": ["--presets", "tiny", "--seq", "64", "--steps", "1"],
    "decode": ["--preset", "tiny", "--new", "8", "--batches", "1", "--dtypes", "float32", "--repeats", "1",
               "--bw-gib", "0.05"],
    "prefill": ["--preset", "tiny", "--lengths", "16", "32"],
    "compile": ["--preset", "tiny", "--layers", "2", "4"],
    "kernels": ["--quick"],
    "gpu": ["--quick"],
    "convert_memory": ["--sizes", "0.01", "0.02"],
    "gguf_convert": ["--sizes", "0.005", "--types", "F16", "Q4_K", "--export", "q8_0"],
    "qlora_loss": ["--base-steps", "6", "--steps", "4"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMOKE))
def test_bench_script_runs(name, tmp_path):
    env = dict(os.environ, XLA_FLAGS="")  # one plain CPU device, as a user's shell has
    cmd = [sys.executable, os.path.join(ROOT, "bench", f"{name}.py")] + SMOKE[name]
    if name == "convert_memory":
        cmd += ["--workdir", str(tmp_path / "not" / "yet")]  # a DIR that does not exist is created
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert records and records[0]["bench"] in ("machine", "gpu_machine")  # the machine and versions come first
    assert len(records) > 1, proc.stdout[-2000:]
