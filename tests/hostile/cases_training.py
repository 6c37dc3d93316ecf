"""Training inputs: run-config values out of range, token ids past the model's vocabulary, and a full disk while
a checkpoint or the final export is written (simulated: the write raises ENOSPC as the OS would)."""

import errno
import json
from unittest import mock

import numpy as np

from hostile import Case


def _build(*overrides):
    def run(tmp):
        from llama_jax.training import run_config
        return run_config.build("", list(overrides))
    return run


def _oov_data(record_max: bool):
    """A token directory whose train.bin holds id 600 for a model of 512 tokens (meta.json's vocab_size says
    259: a tokenizer that understates its vocabulary), with or without the max id recorded at prepare time."""
    def run(tmp):
        from llama_jax.training import data, run_config
        from llama_jax.training.setup import resolve

        class Understated:
            vocab_size, bos_id, eos_id = 259, 1, 2

            def encode(self, text, *, bos=True, eos=False):
                return [1] * bos + [600 if b == ord("!") else b + 3 for b in text.encode()] + [2] * eos

        records = [{"text": f"document {i} " + "words " * 40 + ("!" if i == 3 else "")} for i in range(20)]
        data.write_token_files(str(tmp / "tokens"), records, Understated(), val_every=10, progress=False)
        if not record_max:
            meta = json.loads((tmp / "tokens" / "meta.json").read_text())
            for split in meta["splits"].values():
                split.pop("max_id")
            (tmp / "tokens" / "meta.json").write_text(json.dumps(meta))
        cfg = run_config.build("", [f"workdir={tmp / 'run'}", f"data.path={tmp / 'tokens'}", "model.preset=tiny",
                                    "model.vocab_size=512", "seq_len=16", "batch_size=8", "eval_every=0"])
        return resolve(cfg, log=lambda *a, **k: None)
    return run


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


async def _enospc_async(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def _state(w=None):
    import types

    import jax.numpy as jnp
    w = jnp.ones((4, 4)) if w is None else jnp.asarray(w)
    return types.SimpleNamespace(step=jnp.int32(1), params={"w": w}, opt_state={"mu": jnp.zeros(w.shape)})


def _disk_full_checkpoint(tmp):
    """The data item's write fails in Orbax's background thread; it surfaces when the save is waited for."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    from llama_jax.training.checkpoints import RunCheckpointer

    ckpt = RunCheckpointer(str(tmp))
    with mock.patch.object(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", _enospc_async):
        ckpt.save(1, _state(), {"next": 1}, {"model": {}})
        ckpt.close()


def _disk_full_export(tmp):
    import orbax.checkpoint as ocp

    from llama_jax.training.export import export_params

    from hostile.ckpt_fixtures import tiny_config
    with mock.patch.object(ocp.StandardCheckpointer, "save", _enospc):
        export_params(str(tmp), tiny_config(), {"w": np.ones(3, np.float32)}, None)


def _resume(damage):
    """A training checkpoint of random arrays, damaged, then restored the way a resumed run restores it."""
    def run(tmp):
        import glob
        import os

        import types

        import jax

        from llama_jax.training.checkpoints import RunCheckpointer

        from hostile.ckpt_fixtures import flip
        state = _state(np.random.RandomState(0).randn(256, 64).astype(np.float32))
        ckpt = RunCheckpointer(str(tmp))
        ckpt.save(1, state, {"next": 1}, {"model": {}})
        ckpt.close()
        files = glob.glob(str(tmp / "checkpoints" / "1" / "state" / "**" / "d" / "*"), recursive=True)
        biggest = max(files, key=os.path.getsize)
        os.remove(biggest) if damage == "delete" else flip(biggest)
        like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)  # noqa: E731
        abstract = types.SimpleNamespace(**{k: jax.tree.map(like, v) for k, v in vars(state).items()})
        return RunCheckpointer(str(tmp)).restore(1, abstract)
    return run


CASES = [
    Case("optim.lr is negative", _build("optim.lr=-0.001"), r"optim\.lr=-0\.001: expected a value >= 0"),
    Case("optim.lr is nan", _build("optim.lr=nan"), r"optim\.lr=nan: expected"),
    Case("optim.warmup_steps is negative", _build("optim.warmup_steps=-5"), r"optim\.warmup_steps=-5: expected"),
    Case("seed is negative", _build("seed=-1"), r"seed=-1: expected a value >= 0"),
    Case("data.threads is negative", _build("data.threads=-2"), r"data\.threads=-2: expected"),
    Case("optim.b2 is 1", _build("optim.b2=1"), r"optim\.b2=1\.0: expected a value in \[0, 1\)"),
    Case("optim.b2 is negative", _build("optim.b2=-0.5"), r"optim\.b2=-0\.5: expected a value in \[0, 1\)"),
    Case("eval_every is negative", _build("eval_every=-1"), r"eval_every=-1: expected a value >= 0"),
    Case("eval_batches is negative", _build("eval_batches=-3"), r"eval_batches=-3: expected a value >= 0"),
    Case("a token id past the vocabulary (recorded at prepare)", _oov_data(True),
         r"tokens/train\.bin: holds token id 600, outside the model's vocabulary of 512"),
    Case("a token id past the vocabulary (data without a recorded max)", _oov_data(False),
         r"tokens/train\.bin: holds token id 600, outside"),
    Case("disk full while saving a training checkpoint", _disk_full_checkpoint,
         r"checkpoints: no space left on device while saving"),
    Case("disk full while writing the export", _disk_full_export,
         r"export: no space left on device while writing the export; the previous export .* untouched"),
    Case("a deleted data file of a training checkpoint, on resume", _resume("delete"),
         r"checkpoints/1: cannot read the stored data: .*params\.w"),
    Case("flipped bytes in a training checkpoint, on resume", _resume("flip"),
         r"checkpoints/1: (array params/w does not match the checksum|cannot read the stored data)"),
]
