"""Nothing lost, nothing silently wrong in checkpoints: checksums (io/integrity.py) agree between the converter's
blocks and sharded arrays; a damaged newest training checkpoint falls back to the one before; an export that
fails midway leaves the previous export loadable; checkpoints written before checksums still load (with a log
line). The one-line refusals of damaged files are in tests/hostile/cases_checkpoint.py and cases_training.py."""

import glob
import logging
import os
import re

import numpy as np
import pytest

from hostile import ckpt_fixtures as F
from test_data import corpus_dir
from test_train import TINY

from llama_jax.io import integrity


def test_block_checksums_add_up_to_the_sharded_arrays_checksum():
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    x = np.random.RandomState(0).randn(4, 6, 8).astype(np.float32)
    whole = integrity.block_checksum(x, x.shape)
    halves = integrity.add(integrity.block_checksum(x[:1], x.shape, (slice(0, 1),)),
                           integrity.block_checksum(x[1:], x.shape, (slice(1, 4),)))
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))
    sharded = jax.device_put(x, NamedSharding(mesh, P("a", None, "b")))
    sums = integrity.tree_checksums({"x": sharded, "bf16": jnp.asarray(x, jnp.bfloat16)})
    assert whole == halves == sums["x"]
    assert sums["bf16"] == integrity.block_checksum(np.asarray(jnp.asarray(x, jnp.bfloat16)), x.shape)
    nudged, swapped = x.copy(), x.copy()
    nudged[2, 3, 1] = np.nextafter(nudged[2, 3, 1], 1)  # one bit
    swapped[[0, 1]] = swapped[[1, 0]]
    assert integrity.block_checksum(nudged, x.shape) != whole != integrity.block_checksum(swapped, x.shape)


def test_a_checkpoint_without_checksums_loads_with_a_log_line(tmp_path, caplog):
    import llama_jax

    ckpt = F.checkpoint(tmp_path)
    _, verified = llama_jax.load(str(ckpt))
    F.drop_checksums(ckpt)
    with caplog.at_level(logging.WARNING, logger="llama_jax"):
        _, params = llama_jax.load(str(ckpt))
    assert "no checksums recorded" in caplog.text
    np.testing.assert_array_equal(np.asarray(params["lm_head"]), np.asarray(verified["lm_head"]))


def test_load_with_a_cast_verifies_the_stored_values(tmp_path):
    import llama_jax
    from llama_jax.errors import CorruptCheckpointError

    ckpt = F.checkpoint(tmp_path)
    config, _ = llama_jax.load(str(ckpt), dtype="bfloat16")
    assert config.param_dtype == "bfloat16"
    F.flip(F.chunks(ckpt, "lm_head")[0])
    with pytest.raises(CorruptCheckpointError, match="lm_head"):
        llama_jax.load(str(ckpt), dtype="bfloat16")


# ------------------------------------------------------------------------------------------- export
def test_an_export_that_fails_midway_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    import jax

    import llama_jax
    from llama_jax.io import checkpoint
    from llama_jax.model.transformer import init_params
    from llama_jax.training.export import export_params

    config = F.tiny_config()
    first, second = (init_params(config, jax.random.PRNGKey(k)) for k in (0, 1))
    export_params(str(tmp_path), config, first, None)

    def killed(*args, **kwargs):  # the parameters are written; the process dies before the metadata
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoint, "write_metadata", killed)
    with pytest.raises(KeyboardInterrupt):
        export_params(str(tmp_path), config, second, None)
    monkeypatch.undo()
    _, loaded = llama_jax.load(str(tmp_path / "export"))
    np.testing.assert_array_equal(np.asarray(loaded["lm_head"]), np.asarray(first["lm_head"]))
    # killed between the two renames: the previous export was moved aside; the next export puts things right
    os.rename(tmp_path / "export", tmp_path / ".export.old")
    assert os.path.isdir(tmp_path / ".export.tmp")  # what the kill left
    export_params(str(tmp_path), config, second, None)
    _, loaded = llama_jax.load(str(tmp_path / "export"))
    np.testing.assert_array_equal(np.asarray(loaded["lm_head"]), np.asarray(second["lm_head"]))
    assert sorted(os.listdir(tmp_path)) == ["export"]


# ------------------------------------------------------------------------------------------- resume
def test_a_damaged_newest_training_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    from llama_jax.training import loop as trainer
    from llama_jax.training import run_config

    args = [f"workdir={tmp_path}", *TINY, f"data.path={corpus_dir()}", "checkpoint_every=2", "mesh.fsdp=8"]
    first = trainer.train(run_config.build("", [*args, "steps=4"]), progress=False, export=False)
    data = glob.glob(str(tmp_path / "checkpoints" / "4" / "state" / "**" / "d" / "*"), recursive=True)
    F.flip(max(data, key=os.path.getsize))  # inside the arrays' compressed bytes
    capsys.readouterr()
    again = trainer.train(run_config.build("", [*args, "steps=5"]), progress=False, export=False)
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if line.startswith("checkpoint 4 skipped")]
    assert len(skipped) == 1 and "checkpoints/4: " in skipped[0], out
    assert re.search(r"array \S+ does not match the checksum|cannot read the stored data", skipped[0]), skipped
    assert f"resumed from {tmp_path}/checkpoints/2" in out
    assert os.path.isdir(tmp_path / "corrupt_checkpoints" / "4")
    # from step 2's state and data position, steps 3 and 4 are the same steps again (bitwise)
    assert again.losses[:2] == first.losses[2:4]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4", "5"]
