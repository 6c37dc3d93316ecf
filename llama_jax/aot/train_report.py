"""The train step of a run config compiled for a TPU slice: `compile_train` -> `TrainReport`."""

from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import jax
import jax.numpy as jnp

from llama_jax.aot.analysis import (Compiled, abstract, abstract_bytes_per_device, compile_and_analyze,
                                    hardware_flops_per_token)
from llama_jax.aot.topology import Topology, get_topology, topology_mesh
from llama_jax.config import LlamaConfig
from llama_jax.errors import AotError


@dataclasses.dataclass
class TrainReport:
    """The compiled train step of a recipe on a slice, and the numbers that decide whether it fits."""

    recipe: str
    topology: Topology
    mesh_shape: Dict[str, int]
    config: LlamaConfig
    batch_size: int
    seq_len: int
    grad_accum: int
    compiled: Compiled
    flops_per_step: float         # analytic model FLOPs (train_flops_per_token x tokens): the MFU numerator
    xla_check: Tuple[float, float]  # (XLA cost per device x devices, analytic hardware FLOPs of the same program)

    @property
    def fits(self) -> bool:
        return self.compiled.total <= self.topology.hbm_bytes

    @property
    def headroom(self) -> float:
        return 1.0 - self.compiled.total / self.topology.hbm_bytes

    def step_time(self, mfu: float) -> float:
        """Seconds per step at model-FLOPs utilisation `mfu`."""
        return self.flops_per_step / (mfu * self.topology.peak_flops * len(self.topology.devices))


def _abstract_batch(batch_size: int, seq_len: int, sharding) -> dict:
    """The trainer's batch (llama_jax.training.data rows): inputs, targets, segment_ids, positions, loss_mask."""
    ints = {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=sharding)
            for k in ("inputs", "targets", "segment_ids", "positions")}
    return dict(ints, loss_mask=jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32, sharding=sharding))


def _abstract_images(config: LlamaConfig, batch_size: int, seq_len: int, sharding) -> dict:
    """A Llama 3.2 Vision batch's images (training/step.py IMAGE_KEYS): one image of max_num_tiles tiles per
    row, the processor's float32 pixels, seen by every token."""
    v = config.vision
    tiles = v.max_num_tiles
    shapes = {"pixel_values": ((batch_size, 1, tiles, v.num_channels, v.image_size, v.image_size), jnp.float32),
              "aspect_ratio_ids": ((batch_size, 1), jnp.int32),
              "aspect_ratio_mask": ((batch_size, 1, tiles), jnp.int32),
              "cross_attention_mask": ((batch_size, seq_len, 1, tiles), jnp.int32)}
    return {k: jax.ShapeDtypeStruct(shape, dt, sharding=sharding) for k, (shape, dt) in shapes.items()}


def compile_train(run_config, topology: str, recipe: str = "") -> TrainReport:
    """Compile the train step of `run_config` (a RunConfig) for the TPU slice `topology`: the same optimizer,
    shardings, remat, scan, gradient accumulation, LoRA (and QLoRA's quantized base), objective (DPO) and
    donation as `training.loop.train`, built by the same functions, on abstract inputs."""
    from llama_jax.model import flops as flops_lib
    from llama_jax.model.splash import runs_splash
    from llama_jax.training import dpo
    from llama_jax.training import step as ts
    from llama_jax.training.optim import build_optimizer
    from llama_jax.training.setup import Setup, model_config
    from llama_jax.training.state import Model
    from llama_jax.parallel.sharding import DEFAULT_RULES, MeshError, batch_sharding, batch_shards, mesh_axes_of

    cfg = run_config
    topo = get_topology(topology)
    mesh = topology_mesh(topo, **dataclasses.asdict(cfg.mesh))  # the run config's size for each mesh axis
    config = model_config(cfg)
    shards = batch_shards(mesh, DEFAULT_RULES)
    if (cfg.batch_size // cfg.grad_accum) % shards:
        raise AotError(f"batch_size={cfg.batch_size} / grad_accum={cfg.grad_accum} cannot be split over mesh "
                       f"{'×'.join(mesh_axes_of('batch', DEFAULT_RULES))} = {shards} devices of {topo.name}; use a "
                       f"multiple of {shards * cfg.grad_accum}")
    optimizer, schedule = build_optimizer(cfg)
    setup = Setup(cfg, config, "", {}, mesh, None)
    try:
        model = Model(setup, optimizer)
    except MeshError as e:
        raise AotError(f"{recipe or 'config'} does not fit mesh {dict(mesh.shape)}: {e}") from None
    sh = model.state_shardings
    # the frozen tree: LoRA's base (quantized for QLoRA) or DPO's reference copy
    frozen = None if model.frozen_shapes is None else abstract(model.frozen_shapes, sh.frozen)
    state = ts.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=sh.step),
                          params=abstract(model.shapes, sh.params),
                          opt_state=abstract(jax.eval_shape(optimizer.init, model.shapes), sh.opt_state),
                          frozen=frozen)
    batch = _abstract_batch(cfg.batch_size, cfg.seq_len, batch_sharding(mesh, DEFAULT_RULES))
    if config.vision is not None:  # the step with an image in every row (the data pipeline's rows are text)
        batch.update(_abstract_images(config, cfg.batch_size, cfg.seq_len, batch_sharding(mesh, DEFAULT_RULES)))
    step_fn = ts.make_train_step(config, optimizer, mesh, shardings=sh, schedule=schedule,
                                 accum_steps=cfg.grad_accum, combine=model.combine,
                                 objective=dpo.objective(cfg, config))
    inputs = {"params": abstract_bytes_per_device(state.params),
              "opt_state": abstract_bytes_per_device(state.opt_state), "batch": abstract_bytes_per_device(batch)}
    if frozen is not None:
        inputs["frozen"] = abstract_bytes_per_device(frozen)
    compiled = compile_and_analyze("train_step", step_fn, (state, batch), inputs, mesh)

    tokens = cfg.batch_size * cfg.seq_len
    flops_per_step = flops_lib.train_flops_per_token(config, cfg.seq_len) * tokens
    # XLA counts the layer scan (and the accumulation scan) once: compare with one layer, one micro-batch.
    # Llama 3.2 Vision's self layers are several scans and its cross layers unrolled: no one-layer figure.
    one = config.replace(num_layers=1) if config.vision is None else None
    expected = (hardware_flops_per_token(one, cfg.seq_len) * tokens / cfg.grad_accum if one is not None
                else float("nan"))
    with jax.set_mesh(mesh):  # the slice's platform decides attention="auto"
        splash = runs_splash(config, cfg.seq_len, from_zero=True)
    if splash and one is not None:  # the Pallas kernel is a custom call: XLA counts none of attention's FLOPs
        attention = hardware_flops_per_token(one, cfg.seq_len) - hardware_flops_per_token(one, 0)
        expected -= attention * tokens / cfg.grad_accum
    check = (compiled.xla_flops * len(topo.devices), expected)
    return TrainReport(recipe, topo, dict(mesh.shape), config, cfg.batch_size, cfg.seq_len, cfg.grad_accum,
                       compiled, flops_per_step, check)
