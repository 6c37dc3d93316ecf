"""The converter's handling of bad input (a clear one-line error naming file/key/values, non-zero exit, nothing
left at DST), --force, the safetensors reader/writer, and the checkpoint format's layout guard."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from hf_util import make_hf_model
from llama_jax import LlamaConfig, load
from llama_jax.io.convert import convert_to_llama_jax, main
from llama_jax.io.safetensors_io import SafetensorsFile, SafetensorsWriter, write_arrays
from llama_jax.errors import ConversionError


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny HF checkpoint in several safetensors shards with an index."""
    config = LlamaConfig.from_preset("tiny")
    path = tmp_path_factory.mktemp("hf") / "model"
    make_hf_model(config).save_pretrained(path, max_shard_size="20KB")
    return path


@pytest.fixture
def src(hf_dir, tmp_path):
    path = tmp_path / "src"
    shutil.copytree(hf_dir, path)
    return path


def index_of(src):
    return json.loads((src / "model.safetensors.index.json").read_text())


def rewrite_shard(src, filename, edit):
    """Rewrite one safetensors shard with `edit(list of (name, array)) -> list`, keeping the index in step."""
    f = SafetensorsFile(str(src / filename))
    arrays = edit([(n, f.read(n)) for n in f.tensors])
    write_arrays(str(src / filename), arrays)
    index = index_of(src)
    index["weight_map"] = {n: v for n, v in index["weight_map"].items() if v != filename}
    index["weight_map"].update({n: filename for n, _ in arrays})
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


def shard_holding(src, name):
    return index_of(src)["weight_map"][name]


def run_cli(capsys, *args):
    rc = main([*map(str, args), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def assert_failed_cleanly(rc, err, dst, *fragments):
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    assert not dst.exists()
    leftovers = [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]
    assert leftovers == [], leftovers


def test_missing_config_json(src, tmp_path, capsys):
    os.remove(src / "config.json")
    rc, err = run_cli(capsys, src, tmp_path / "dst")
    assert_failed_cleanly(rc, err, tmp_path / "dst", str(src), "config.json")


def test_missing_params_json(tmp_path, capsys):
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "consolidated.00.pth").write_bytes(b"")
    rc, err = run_cli(capsys, meta, tmp_path / "dst")
    assert_failed_cleanly(rc, err, tmp_path / "dst", str(meta / "params.json"), "file not found")


def test_missing_shard(src, tmp_path, capsys):
    filename = shard_holding(src, "model.layers.1.mlp.up_proj.weight")
    os.remove(src / filename)
    rc, err = run_cli(capsys, src, tmp_path / "dst")
    assert_failed_cleanly(rc, err, tmp_path / "dst", filename, "does not exist")


def test_truncated_shard(src, tmp_path, capsys):
    filename = shard_holding(src, "model.layers.1.mlp.up_proj.weight")
    data = (src / filename).read_bytes()
    (src / filename).write_bytes(data[:-100])
    rc, err = run_cli(capsys, src, tmp_path / "dst")
    assert_failed_cleanly(rc, err, tmp_path / "dst", filename, "truncated", str(len(data) - 100))


def test_index_naming_a_file_outside_src(src, tmp_path, capsys):
    name = "model.layers.0.mlp.up_proj.weight"
    shutil.copy(src / shard_holding(src, name), tmp_path / "elsewhere.safetensors")
    index = index_of(src)
    index["weight_map"][name] = "../elsewhere.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    rc, err = run_cli(capsys, src, tmp_path / "dst")
    assert_failed_cleanly(rc, err, tmp_path / "dst", "../elsewhere.safetensors", "outside", name)


def test_wrong_tensor_shape(src, tmp_path, capsys):
    name = "model.layers.1.self_attn.k_proj.weight"  # tiny: 2 kv heads x 16 = 32 rows, 64 columns
    rewrite_shard(src, shard_holding(src, name),
                  lambda arrays: [(n, a[:16] if n == name else a) for n, a in arrays])
    rc, err = run_cli(capsys, src, tmp_path / "dst")
    assert_failed_cleanly(rc, err, tmp_path / "dst", name, "(16, 64)", "expected (32, 64)",
                          shard_holding(src, name))


def test_unknown_tensor_name(src, tmp_path, capsys):
    name = "model.layers.0.self_attn.q_norm.weight"
    filename = shard_holding(src, "model.norm.weight")
    rewrite_shard(src, filename, lambda arrays: arrays + [(name, np.ones(16, np.float32))])
    rc, err = run_cli(capsys, src, tmp_path / "dst")
    assert_failed_cleanly(rc, err, tmp_path / "dst", "unknown tensor name", name, filename)


def test_missing_tensor_name(src, tmp_path, capsys):
    name = "model.layers.1.post_attention_layernorm.weight"
    rewrite_shard(src, shard_holding(src, name), lambda arrays: [(n, a) for n, a in arrays if n != name])
    rc, err = run_cli(capsys, src, tmp_path / "dst")
    assert_failed_cleanly(rc, err, tmp_path / "dst", "missing tensor", name)


def test_truncated_meta_shard(tmp_path, capsys):
    import torch

    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 256}))
    torch.save({"tok_embeddings.weight": torch.zeros(256, 64)}, meta / "consolidated.00.pth")
    data = (meta / "consolidated.00.pth").read_bytes()
    (meta / "consolidated.00.pth").write_bytes(data[: len(data) // 2])
    rc, err = run_cli(capsys, meta, tmp_path / "dst")
    assert_failed_cleanly(rc, err, tmp_path / "dst", str(meta / "consolidated.00.pth"), "truncated or damaged")


def test_existing_destination_needs_force(src, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    rc, err = run_cli(capsys, src, dst)
    assert rc == 1 and len(err) == 1 and "already exists and is not empty" in err[0] and "--force" in err[0]
    assert (dst / "keep.txt").read_text() == "precious"
    assert run_cli(capsys, src, dst, "--force")[0] == 0
    assert not (dst / "keep.txt").exists() and (dst / "llama_jax.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dst.")] == []


def test_failure_while_writing_leaves_nothing(src, tmp_path, monkeypatch):
    import llama_jax.io.convert as convert

    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full (simulated)")
        return original(*args)

    original = convert.read_block
    monkeypatch.setattr(convert, "read_block", failing)
    with pytest.raises(OSError, match="simulated"):
        convert_to_llama_jax(src, tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dst.")] == []


def test_destination_inside_source_is_refused(src):
    with pytest.raises(ConversionError, match="would replace the source"):
        convert_to_llama_jax(src, src, force=True, progress=False)


def test_checkpoint_of_another_layout_is_refused_by_name(src, tmp_path):
    out = convert_to_llama_jax(src, tmp_path / "ckpt", progress=False)
    meta = json.loads((out / "llama_jax.json").read_text())
    assert meta["param_layout"] == "llama_jax/stacked-v1" and meta["dtype"] == "float32"
    meta["param_layout"] = "someone-else/unstacked"
    (out / "llama_jax.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="layout 'someone-else/unstacked'.*llama_jax/stacked-v1"):
        load(out)
    with pytest.raises(ValueError, match="not a checkpoint llama_jax knows"):
        load(tmp_path)


def test_cli_subprocess_one_line_error_and_success(src, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    bad = subprocess.run([sys.executable, "-m", "llama_jax.convert", str(tmp_path / "nowhere"), str(tmp_path / "x")],
                         capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nowhere'}: no such directory"
    good = subprocess.run([sys.executable, "-m", "llama_jax.convert", str(src), str(tmp_path / "ok"),
                           "--dtype", "bfloat16"], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert good.returncode == 0, good.stderr
    assert "converting" in good.stderr  # the progress bar
    assert json.loads((tmp_path / "ok" / "llama_jax.json").read_text())["dtype"] == "bfloat16"


def test_safetensors_writer_streams_blocks_and_reader_reads_rows(tmp_path):
    import ml_dtypes
    import safetensors.numpy

    a = np.arange(24, dtype=np.float32).reshape(6, 4)
    b = np.arange(5, dtype=np.float16)
    path = str(tmp_path / "x.safetensors")
    with SafetensorsWriter(path, [("a", a.dtype, a.shape), ("b", b.dtype, b.shape)]) as w:
        w.write("a", a[:2])
        w.write("a", a[2:])
        w.write("b", b)
    loaded = safetensors.numpy.load_file(path)  # the reference reader accepts our files
    np.testing.assert_array_equal(loaded["a"], a)
    np.testing.assert_array_equal(loaded["b"], b)
    f = SafetensorsFile(path)
    np.testing.assert_array_equal(f.read_rows("a", 2, 5), a[2:5])
    c = np.arange(6).astype(ml_dtypes.bfloat16)
    write_arrays(path, [("c", c)])
    assert SafetensorsFile(path).read("c").dtype == ml_dtypes.bfloat16


def test_export_reads_a_default_orbax_checkpoint(tmp_path):
    """Parameters saved by plain Orbax (OCDBT, as training does) plus our metadata export like converted ones."""
    import jax
    import orbax.checkpoint as ocp
    import transformers

    from hf_util import hf_logits
    from llama_jax import Llama, init_params
    from llama_jax.io.checkpoint import write_metadata
    from llama_jax.io.convert import export_to_hf

    config = LlamaConfig.from_preset("tiny")
    params = init_params(config, jax.random.PRNGKey(0))
    (tmp_path / "ckpt").mkdir()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt" / "params", params)
    assert (tmp_path / "ckpt" / "params" / "manifest.ocdbt").exists()
    write_metadata(str(tmp_path / "ckpt"), config, "float32")
    out = export_to_hf(tmp_path / "ckpt", tmp_path / "hf", progress=False)
    model = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (1, 16))
    np.testing.assert_allclose(hf_logits(model, tokens), Llama(config).apply({"params": params}, tokens),
                               atol=1e-5, rtol=0)
