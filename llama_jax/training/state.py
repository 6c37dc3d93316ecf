"""The train state of a run: which tree is trained (the whole model, or LoRA adapters over a frozen base),
its shardings, and where step 0 comes from — the workdir's latest checkpoint (resume) or a fresh init."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

from llama_jax.errors import TrainError
from llama_jax.parallel.sharding import param_shardings
from llama_jax.training import lora as lora_lib
from llama_jax.training import step as ts
from llama_jax.training.checkpoints import RunCheckpointer, abstract_like
from llama_jax.training.setup import Setup


class Model:
    """The trained tree, the frozen tree and how they combine (full training or LoRA)."""

    def __init__(self, setup: Setup, optimizer):
        cfg, config, mesh = setup.cfg, setup.model, setup.mesh
        self.lora = cfg.lora.rank > 0
        self.base_shardings = param_shardings(config, mesh)
        if self.lora:
            self.shapes = lora_lib.lora_shapes(config, cfg.lora.rank, cfg.lora.targets)
            self.shardings = lora_lib.lora_shardings(config, cfg.lora.rank, cfg.lora.targets, mesh)
            self.combine = lora_lib.make_combine(cfg.lora.alpha)
            frozen = self.base_shardings
        else:
            from llama_jax.model.transformer import param_shapes
            self.shapes, self.shardings, self.combine, frozen = param_shapes(config), self.base_shardings, \
                ts.identity_combine, None
        self.state_shardings = ts.state_shardings(config, optimizer, mesh, params_shapes=self.shapes,
                                                  params_shardings=self.shardings, frozen_shardings=frozen)

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
    """(state, first step, data iterator state): restored from the workdir's latest checkpoint when there is
    one (which must be of the same model), else step 0 of a fresh init (None: the iterator starts afresh)."""
    frozen = model.base_params(setup) if model.lora else None
    start = ckpt.latest_step()
    if start is None:
        return init_state(setup, model, optimizer, frozen), 0, None
    prev = ckpt.read_config(start)
    if prev.get("model") != saved_config["model"]:
        raise TrainError(f"{ckpt.directory}: its checkpoints are of another model; use a new workdir")
    sh = model.state_shardings
    abstract = ts.TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=sh.step),
        params=abstract_like(model.shapes, model.shardings),
        opt_state=abstract_like(jax.eval_shape(optimizer.init, model.shapes), sh.opt_state))
    tree, data_state, _ = ckpt.restore(start, abstract)
    state = ts.TrainState(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"], frozen=frozen)
    say(f"resumed from {ckpt.directory}/{start}")
    return state, start, data_state


def init_state(setup: Setup, model: Model, optimizer, frozen=None) -> ts.TrainState:
    """Step 0: fresh LoRA adapters (seed + 1) over `frozen`, or the base weights themselves."""
    cfg = setup.cfg
    if model.lora:
        params = jax.jit(lambda k: lora_lib.init_lora(setup.model, cfg.lora.rank, cfg.lora.targets, k),
                         out_shardings=model.shardings)(jax.random.PRNGKey(cfg.seed + 1))
    else:
        params = model.base_params(setup)
    return ts.init_train_state(params, optimizer, model.state_shardings, frozen=frozen)
