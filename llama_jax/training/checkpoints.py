"""Training checkpoints: Orbax CheckpointManager over WORKDIR/checkpoints.

Each checkpoint (one directory per step, written asynchronously, the last `keep` kept) holds three items:
    state    {"step", "params", "opt_state"}: the trained tree and its optimizer state, restored straight into
             their shardings (the frozen base of a LoRA run is not saved: it is reloaded from init_from)
    data     the data iterator's state (grain `get_state()`), so the run continues on the next batch
    config   the run config and the model config, as JSON, to refuse resuming with another model
Orbax writes a step into a temporary directory and renames it when complete, so `latest_step()` only sees
complete checkpoints: a run killed at any moment resumes from the last one that finished.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import jax

from llama_jax.errors import CheckpointError

_ITEMS = ("state", "data", "config")


class RunCheckpointer:
    """Save / restore the train state, data-iterator state and config of one run."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        import orbax.checkpoint as ocp

        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
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
        background). `state` is the TrainState; only step, params and opt_state are written."""
        ocp = self._ocp
        tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree), data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config)), force=True)

    def restore(self, step: int, abstract_state: Any) -> Tuple[dict, dict, dict]:
        """(state tree {"step", "params", "opt_state"}, data state, config) of checkpoint `step`.

        `abstract_state`: a TrainState of jax.ShapeDtypeStruct leaves carrying the target shardings."""
        ocp = self._ocp
        target = {"step": abstract_state.step, "params": abstract_state.params,
                  "opt_state": abstract_state.opt_state}
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{self.directory}/{step}: cannot restore into this run's state "
                                  f"(different model, LoRA settings or optimizer?): {str(e)[:500]}") from None
        return out["state"], out["data"], out["config"]

    def read_config(self, step: int) -> dict:
        ocp = self._ocp
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def reached_preemption(self, step: int) -> bool:
        """Multi-host: True on every process once any of them got the preemption notice (SIGTERM on TPU VMs),
        at the same step (Orbax's sync point through the jax.distributed coordination service)."""
        return bool(self.manager.reached_preemption(step))

    def wait(self) -> None:
        """Block until the background writes are done."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) with `shardings` attached."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
