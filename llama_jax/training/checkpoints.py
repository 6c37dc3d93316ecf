"""Training checkpoints: Orbax CheckpointManager over WORKDIR/checkpoints.

Each checkpoint (one directory per step, written asynchronously, the last `keep` kept) holds three items:
    state    {"step", "params", "opt_state"}: the trained tree and its optimizer state, restored straight into
             their shardings (the frozen base of a LoRA run is not saved: it is reloaded from init_from)
    data     the data iterator's state (grain `get_state()`), so the run continues on the next batch
    config   the run config and the model config, as JSON, to refuse resuming with another model
Orbax writes a step into a temporary directory and renames it when complete, so `latest_step()` only sees
complete checkpoints: a run killed at any moment resumes from the last one that finished.

The config item also records a checksum of every array of `state` (io/integrity.py), computed on the devices
when the step is saved and checked after it is restored: a damaged or missing chunk is a
CorruptCheckpointError naming the step and the array, and `training/state.py` then resumes from the newest
older checkpoint that restores and verifies. A full disk while saving is one line naming the directory.
"""

from __future__ import annotations

import contextlib
import errno
import json
from typing import Any, Optional, Tuple

import jax

from llama_jax.errors import CheckpointError, CorruptCheckpointError
from llama_jax.io import checkpoint as params_checkpoint
from llama_jax.io import integrity, paths

_ITEMS = ("state", "data", "config")


class RunCheckpointer:
    """Save / restore the train state, data-iterator state and config of one run."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        import orbax.checkpoint as ocp

        # local or gs://: Orbax writes a gs:// step in place and marks it complete with commit_success.txt
        self.directory = paths.absolute(paths.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)
        self._ocp = ocp

    def latest_step(self) -> Optional[int]:
        """The step of the newest complete checkpoint, or None."""
        return self.manager.latest_step()

    def all_steps(self):
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
        """Start saving (returns once the arrays are copied off the devices; the write continues in the
        background). `state` is the TrainState; only step, params and opt_state are written, with their
        checksums in the config item."""
        ocp = self._ocp
        tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
        sums = {"algorithm": integrity.ALGORITHM, "arrays": integrity.tree_checksums(tree)}
        with self._disk_full(f"saving step {step}"):
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree), data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(dict(config, checksums=sums))), force=True)

    def restore(self, step: int, abstract_state: Any) -> Tuple[dict, dict, dict]:
        """(state tree {"step", "params", "opt_state"}, data state, config) of checkpoint `step`, verified
        against its checksums (CorruptCheckpointError when its data is missing or damaged).

        `abstract_state`: a TrainState of jax.ShapeDtypeStruct leaves carrying the target shardings."""
        ocp = self._ocp
        target = {"step": abstract_state.step, "params": abstract_state.params,
                  "opt_state": abstract_state.opt_state}
        where = f"{self.directory}/{step}"
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - Orbax and tensorstore raise bare Exceptions with the whole spec
            if _is_damage(e):
                raise CorruptCheckpointError(f"{where}: cannot read the stored data: "
                                             f"{params_checkpoint.read_error(e)}") from None
            if not isinstance(e, (ValueError, KeyError, TypeError)):
                raise
            raise CheckpointError(f"{where}: cannot restore into this run's state "
                                  f"(different model, LoRA settings or optimizer?): {str(e)[:500]}") from None
        recorded = (out["config"] or {}).get("checksums")
        params_checkpoint.verify(where, recorded,  # no pass over the state when there is nothing to compare
                                 integrity.tree_checksums(out["state"]) if recorded is not None else {}, "restored")
        return out["state"], out["data"], out["config"]

    def read_config(self, step: int) -> dict:
        ocp = self._ocp
        try:
            return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        except Exception as e:  # noqa: BLE001 - a missing or damaged config.json, whatever Orbax makes of it
            raise CorruptCheckpointError(f"{self.directory}/{step}/config: cannot be read: "
                                         f"{params_checkpoint.read_error(e)}") from None

    def set_aside(self, step: int) -> str:
        """Move checkpoint `step` out of the checkpoints directory (to WORKDIR/corrupt_checkpoints/STEP), so the
        run can write that step again; returns where it went. Process 0 only; call `reload` after it."""
        parent = paths.join(paths.dirname(self.directory), "corrupt_checkpoints")
        paths.makedirs(parent)
        dst, n = paths.join(parent, str(step)), 1
        while paths.exists(dst):
            dst, n = paths.join(parent, f"{step}.{n}"), n + 1
        paths.move(paths.join(self.directory, str(step)), dst)
        return dst

    def reload(self) -> None:
        self.manager.reload()

    def reached_preemption(self, step: int) -> bool:
        """Multi-host: True on every process once any of them got the preemption notice (SIGTERM on TPU VMs),
        at the same step (Orbax's sync point through the jax.distributed coordination service)."""
        return bool(self.manager.reached_preemption(step))

    def wait(self) -> None:
        """Block until the background writes are done."""
        with self._disk_full("saving a checkpoint"):
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            with self._disk_full("saving a checkpoint"):
                self.manager.wait_until_finished()
        finally:
            self.manager.close()

    @contextlib.contextmanager
    def _disk_full(self, what: str):
        """A full disk (in the save call or in its background write) as one line naming the directory."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - tensorstore reports ENOSPC as a ValueError, Orbax re-raises it
            if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
                last = self.manager.latest_step()
                resume = f"the newest complete checkpoint is step {last}" if last is not None else "no checkpoint " \
                    "is complete yet"
                raise CheckpointError(f"{self.directory}: no space left on device while {what}; {resume}: free "
                                      "some space and restart with the same workdir") from None
            raise


def _is_damage(e: BaseException) -> bool:
    """Whether a restore error is missing or damaged data (not a checkpoint of another shape)."""
    while e is not None:  # Orbax wraps tensorstore's error (its __cause__) in a bare Exception
        if isinstance(e, (FileNotFoundError, json.JSONDecodeError)) or any(
                k in str(e) for k in ("NOT_FOUND", "DATA_LOSS", "Error reading", "Zstd", "Truncated", "corrupt",
                                      "No such file")):
            return True
        e = e.__cause__ or e.__context__
    return False


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) with `shardings` attached."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
