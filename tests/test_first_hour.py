"""A new user's first hour (issue #18): the installed package works from any directory, the command lines start
without libtpu's noise on a host without a TPU, dashed flags everywhere (old spellings accepted quietly), the
converter's one line on success, and the README's quick start says what it should."""

import argparse
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from llama_jax.cpu import platform
from llama_jax.errors import plural

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
LIBTPU_NOISE = re.compile(r"host bounds|worker hostname|TPU_ACCELERATOR_TYPE|libtpu|InitGoogle", re.IGNORECASE)


def _clean_env(**extra):
    """A user's shell: no PYTHONPATH into the repository, jax left to pick its platform."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JAX_PLATFORMS", "XLA_FLAGS")}
    return dict(env, **extra)


def test_installed_package_runs_from_any_directory(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llama_jax.convert", "--help"], cwd=tmp_path, env=_clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--push-to-hub" in proc.stdout and "--no-progress" in proc.stdout


def test_readme_quick_start():
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.search(r"```bash\n(.*?)```", quick, re.S).group(1).strip().splitlines()
    assert len(commands) == 2
    assert "pip install -e ." in commands[0] or "pip install ." in commands[0]  # import llama_jax anywhere
    assert "python -m pytest -q tests" in commands[1]
    assert re.search(r"\d+ minutes", quick) and '-m "not slow"' in quick  # the suite's cost, and a quick subset
    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    version = re.search(r'requires-python = ">=(3\.\d+)"', pyproject).group(1)
    assert f"Python {version}+" in quick
    listed = set(re.findall(r"`([a-z_]+)`", README))  # the override list: `key` and `section.{a,b,...}`
    for section, keys in re.findall(r"`([a-z]+)\.\{([a-z_,\s]+)\}`", README):
        listed |= {f"{section}.{k.strip()}" for k in keys.split(",")}
    for key in ("data.threads", "data.prefetch", "sample_tokens", "sample_prompt"):
        assert key in listed, key
    assert "stream=print)" not in README  # print adds a newline per token


# ------------------------------------------------------------------------------------------- libtpu noise
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (requirements-test.txt) is not "
                    "installed: nothing to probe")
@pytest.mark.skipif(platform.tpu_attached() or platform.gpu_visible(), reason="an accelerator host")
def test_command_lines_start_without_libtpu_noise(tmp_path):
    from test_data import CACHE_ROOT

    env = _clean_env(LLAMA_JAX_CACHE=CACHE_ROOT)
    work = str(tmp_path / "run")
    train = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--no-progress", f"workdir={work}",
                            "steps=2", "model.preset=tiny", "model.vocab_size=512", "batch_size=8", "seq_len=64",
                            "eval_every=0", "sample_tokens=0"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    sample = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--checkpoint", work,
                             "--max-new-tokens", "2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert sample.returncode == 0, sample.stderr[-3000:]
    for proc in (train, sample):
        assert not LIBTPU_NOISE.search(proc.stdout + proc.stderr), (proc.stdout + proc.stderr)[-3000:]


def test_tpu_and_gpu_detection(tmp_path, monkeypatch):
    pci = tmp_path / "pci"
    for name, vendor, device in (("nic", "0x1ae0", "0x0042"), ("disk", "0x1af4", "0x1001")):  # gVNIC, virtio
        (pci / name).mkdir(parents=True)
        (pci / name / "vendor").write_text(vendor + "\n")
        (pci / name / "device").write_text(device + "\n")
    assert not platform.tpu_attached(str(pci), dev_globs=())  # Google's vendor id alone is a GCE VM, not a TPU
    (pci / "tpu").mkdir()
    (pci / "tpu" / "vendor").write_text("0x1ae0\n")
    (pci / "tpu" / "device").write_text("0x0063\n")  # v5e
    assert platform.tpu_attached(str(pci), dev_globs=())
    (tmp_path / "accel0").write_text("")
    assert platform.tpu_attached(str(tmp_path / "none"), dev_globs=(str(tmp_path / "accel*"),))
    assert platform.gpu_visible((str(tmp_path / "accel0"),)) and not platform.gpu_visible((str(pci / "x"),))
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")  # the user's choice is kept
    assert not platform.cpu_unless_accelerator() and os.environ["JAX_PLATFORMS"] == "tpu"


# ------------------------------------------------------------------------------------------- flags and lines
def test_dashed_flags_with_old_spellings_accepted_quietly(capsys):
    from llama_jax.parallel import distributed
    from llama_jax.training import data

    parser = distributed.add_flags(argparse.ArgumentParser())
    text = parser.format_help()
    assert "--coordinator-address" in text and "--coordinator_address" not in text
    new = parser.parse_args(["--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "1"])
    old = parser.parse_args(["--coordinator_address", "h:1", "--num_processes", "2", "--process_id", "1"])
    assert vars(new) == vars(old) == {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}

    with pytest.raises(SystemExit):
        data.main(["prepare", "--help"])
    text = capsys.readouterr().out
    assert "--val-every" in text and "--text-docs" in text and "--val_every" not in text

    sys.path.insert(0, ROOT)
    import train
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    assert "--no-progress" in text and "--no_progress" not in text


def test_counts_read_as_english():
    assert plural(1, "device") == "1 device" and plural(2, "device") == "2 devices"


def test_converter_prints_one_line_on_success(tmp_path, capsys):
    from llama_jax.io.convert import main
    from test_sampling import write_tiny_checkpoint

    src = write_tiny_checkpoint(str(tmp_path / "hf"))
    capsys.readouterr()
    assert main([src, str(tmp_path / "ckpt"), "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(rf"wrote a llama_jax checkpoint to {tmp_path / 'ckpt'}: \d+ files, "
                                            r"[\d.]+ (MB|kB|GB)", lines[0]), lines

