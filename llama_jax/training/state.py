"""The train state of a run: which tree is trained (the whole model, or LoRA adapters over a frozen base,
float or quantized for QLoRA), the frozen tree (the LoRA base; for DPO also the reference model), their
shardings, and where step 0 comes from — the workdir's latest checkpoint (resume) or a fresh init."""

from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

from llama_jax.errors import CorruptCheckpointError, TrainError
from llama_jax.model import quantize, spec
from llama_jax.parallel import distributed
from llama_jax.parallel.sharding import param_shardings
from llama_jax.training import lora as lora_lib
from llama_jax.training import step as ts
from llama_jax.training.checkpoints import RunCheckpointer, abstract_like
from llama_jax.training.setup import Setup


class Model:
    """The trained tree, the frozen tree and how they combine (full training or LoRA).

    The frozen tree is the LoRA base (quantized when lora.base_quant is int8/nf4), or, for full-weight DPO,
    a copy of the starting weights: DPO's reference model is always `frozen` (with LoRA, the base without
    adapters — no second copy)."""

    def __init__(self, setup: Setup, optimizer):
        from llama_jax.model.transformer import param_shapes

        cfg, config, mesh = setup.cfg, setup.model, setup.mesh
        self.lora = cfg.lora.rank > 0
        self.base_quant = cfg.lora.base_quant if self.lora else "none"
        self.base_shardings = param_shardings(config, mesh)
        base_shapes = param_shapes(config)
        if self.lora:
            self.shapes = lora_lib.lora_shapes(config, cfg.lora.rank, cfg.lora.targets)
            self.shardings = lora_lib.lora_shardings(config, cfg.lora.rank, cfg.lora.targets, mesh)
            self.combine = lora_lib.make_combine(cfg.lora.alpha)
        else:
            self.shapes, self.shardings, self.combine = base_shapes, self.base_shardings, ts.identity_combine
        has_frozen = self.lora or cfg.objective == "dpo"
        self.frozen_shapes, frozen = (base_shapes, self.base_shardings) if has_frozen else (None, None)
        if self.base_quant != "none":
            self.frozen_shapes = quantize.quantized_shapes(base_shapes, self.base_quant)
            frozen = quantize.quantized_shardings(self.base_shardings, self.base_quant, base_shapes)
        self.state_shardings = ts.state_shardings(config, optimizer, mesh, params_shapes=self.shapes,
                                                  params_shardings=self.shardings, frozen_shardings=frozen)

    def frozen_params(self, setup: Setup):
        """The frozen tree (None when there is none): the base weights, quantized leaf by leaf for QLoRA (each
        float leaf is dropped once quantized)."""
        if self.frozen_shapes is None:
            return None
        if self.base_quant == "none":
            return self.base_params(setup)
        quantized = {}
        for path, w in self._base_leaves(setup):
            sharding = self.state_shardings.frozen
            for key in path:
                sharding = sharding[key]
            if quantize.is_quantized(sharding):
                w = jax.jit(functools.partial(quantize.quantize_weight, path=path, kind=self.base_quant),
                            out_shardings=sharding)(w)
            quantized[path] = w  # the float leaf goes once its quantized copy exists
        return spec.nest(quantized.items())

    def _base_leaves(self, setup: Setup):
        """(path, float array) of the base, one leaf at a time: read straight from init_from's files, so the
        float model is never whole on the devices (a 70B base fits a v5e-8 only quantized); a random init is
        made whole first, then handed out leaf by leaf."""
        if setup.cfg.init_from:
            from llama_jax.io.loading import load_leaf_by_leaf

            _, leaves = load_leaf_by_leaf(setup.cfg.init_from, dtype=setup.model.param_dtype, mesh=setup.mesh)
            yield from leaves
            return
        flat = [(tuple(str(getattr(k, "key", k)) for k in path), w)
                for path, w in jax.tree_util.tree_flatten_with_path(self.base_params(setup))[0]]
        for i in range(len(flat)):
            path, w = flat[i]
            flat[i] = None  # drop our reference as soon as the caller has it
            yield path, w

    def base_params(self, setup: Setup):
        """The model weights to start from: init_from's checkpoint, or a seeded random init."""
        if setup.cfg.init_from:
            import llama_jax
            _, params = llama_jax.load(setup.cfg.init_from, dtype=setup.model.param_dtype, mesh=setup.mesh)
            return params
        from llama_jax.parallel.sharding import init_sharded_params
        return init_sharded_params(setup.model, setup.mesh, jax.random.PRNGKey(setup.cfg.seed))


def start_state(setup: Setup, model: Model, optimizer, ckpt: RunCheckpointer, saved_config: dict,
                say=print) -> Tuple[ts.TrainState, int, Optional[Any]]:
    """(state, first step, data iterator state): restored from the workdir's newest checkpoint that restores and
    verifies (which must be of the same model), else step 0 of a fresh init (None: the iterator starts afresh).

    A newer checkpoint whose data is missing or damaged is skipped with one line that names it and why, and
    moved to WORKDIR/corrupt_checkpoints so the run can write that step again."""
    frozen = model.frozen_params(setup)
    steps = sorted(ckpt.all_steps(), reverse=True)
    if not steps:
        return init_state(setup, model, optimizer, frozen), 0, None
    sh = model.state_shardings
    abstract = ts.TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=sh.step),
        params=abstract_like(model.shapes, model.shardings),
        opt_state=abstract_like(jax.eval_shape(optimizer.init, model.shapes), sh.opt_state))
    skipped = []
    for step in steps:
        restored, why = _try_restore(ckpt, step, abstract, saved_config)
        if restored is not None:
            break
        skipped.append(step)
        say(f"checkpoint {step} skipped: {why}")
    else:
        raise TrainError(f"{ckpt.directory}: no checkpoint restores and verifies (steps {steps}); move the "
                         "directory aside to start afresh")
    if skipped:
        _set_aside(ckpt, skipped, say)
    tree, data_state = restored
    state = ts.TrainState(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"], frozen=frozen)
    say(f"resumed from {ckpt.directory}/{step}" + (f" (newer checkpoint(s) {skipped} were damaged)"
                                                     if skipped else ""))
    return state, step, data_state


def _try_restore(ckpt: RunCheckpointer, step: int, abstract, saved_config: dict):
    """((state tree, data state), None) of checkpoint `step`, or (None, why) when its data is missing or damaged
    on any process (all processes agree, so they fall back together). Another model is a TrainError."""
    try:
        prev = ckpt.read_config(step)
        if prev.get("model") != saved_config["model"]:
            raise TrainError(f"{ckpt.directory}: its checkpoints are of another model; use a new workdir")
        tree, data_state, _ = ckpt.restore(step, abstract)
        restored, why = (tree, data_state), None
    except CorruptCheckpointError as e:
        restored, why = None, str(e)
    if not distributed.all_processes(restored is not None):
        return None, why or "damaged on another process"
    return restored, None


def _set_aside(ckpt: RunCheckpointer, steps, say) -> None:
    """Move the damaged checkpoints `steps` out of the way (process 0), then every process re-reads the list."""
    if jax.process_index() == 0:
        for step in steps:
            say(f"checkpoint {step} moved to {ckpt.set_aside(step)}")
    distributed.barrier("checkpoints set aside")
    ckpt.reload()


def init_state(setup: Setup, model: Model, optimizer, frozen=None) -> ts.TrainState:
    """Step 0: fresh LoRA adapters (seed + 1) over `frozen`, or the base weights themselves."""
    cfg = setup.cfg
    if model.lora:
        params = jax.jit(lambda k: lora_lib.init_lora(setup.model, cfg.lora.rank, cfg.lora.targets, k),
                         out_shardings=model.shardings)(jax.random.PRNGKey(cfg.seed + 1))
    else:
        params = model.base_params(setup)
    return ts.init_train_state(params, optimizer, model.state_shardings, frozen=frozen)
