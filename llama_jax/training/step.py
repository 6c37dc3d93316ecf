"""Loss and the jitted, sharded, donated training step (and a sharded forward pass); the optimizer is in
training/optim.py.

Legend: B global batch, T sequence length, V vocab, k micro-batches (gradient accumulation).

A batch is a dict of [B, T] arrays:
    inputs       int32   tokens fed to the model (or `tokens` [B, T+1]: inputs = tokens[:, :-1],
                         targets = tokens[:, 1:])
    targets      int32   the next token of each input position
    positions    int32   optional; default 0..T-1 (packed data gives per-document positions)
    segment_ids  int32   optional; attention never crosses segments; segment 0 is padding
    loss_mask    float   optional per-target weight (0 for padding, chat prompts, document boundaries);
                         default: 1 where segment_ids != 0 (or everywhere without segment_ids)

A Llama 3.2 Vision model's batch may add its images, each array as MllamaProcessor gives it, batch first (I
images per row, tiles per image; rows with fewer images pad with masked ones): pixel_values float
[B, I, tiles, C, H, W], aspect_ratio_ids int32 [B, I], aspect_ratio_mask int32 [B, I, tiles] and
cross_attention_mask int32 [B, T, I, tiles] (T as `inputs`; with `tokens` [B, T+1] it may be T+1 long, the
last position dropped). The image encoder and projector are frozen (gradients stop at them; see
training/optim.py `freeze_image_encoder`).

The loss is the weighted mean of float32 next-token cross entropy over the whole global batch (sum of
weighted losses / sum of weights), so k accumulated micro-batches give exactly one k-times-larger batch.
Another objective (DPO, training/dpo.py) is an `Objective`: it returns the same kind of sums (a total, a
weight, and named metric sums), so accumulation, the gradient and the metrics stay exact for it too.

The state is a `TrainState` pytree: `params` are the trained leaves (float32 master weights when
config.param_dtype is float32; the model computes in config.dtype), `opt_state` the optax state, and
`frozen` an optional tree of leaves that are used but not trained (e.g. the base weights under LoRA), combined
with `params` by the `combine(params, frozen) -> model params` hook of `make_train_step`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from llama_jax.config import LlamaConfig
from llama_jax.model.transformer import Llama
from llama_jax.parallel.sharding import (DEFAULT_RULES, batch_sharding, check_batch_size, param_shardings,
                                         replicated, use_mesh)

Batch = Mapping[str, jax.Array]


class TrainState(flax.struct.PyTreeNode):
    """step: int32 scalar (optimizer updates done); params: the trained tree; opt_state: optax state of
    `params`; frozen: a tree used by the model but not trained (None unless e.g. LoRA)."""

    step: jax.Array
    params: Any
    opt_state: Any
    frozen: Any = None


# ---------------------------------------------------------------------------------------------- shardings
def _dict_path(path) -> tuple:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def opt_state_shardings(optimizer: optax.GradientTransformation, params_shapes, params_shardings, mesh: Mesh):
    """Shardings of `optimizer.init(params)`: each leaf shaped like a parameter (Adam's mu/nu, ...) takes that
    parameter's sharding, matched by its dict-key path and shape; everything else (counts) is replicated."""
    by_path = {}
    for path, sharding in jax.tree_util.tree_flatten_with_path(params_shardings)[0]:
        by_path[_dict_path(path)] = sharding
    shapes = {_dict_path(p): s.shape for p, s in jax.tree_util.tree_flatten_with_path(params_shapes)[0]}
    state_shapes = jax.eval_shape(optimizer.init, params_shapes)

    def one(path, leaf):
        keys = _dict_path(path)
        # The param path is a suffix of the state path (the state adds its own keys in front).
        for start in range(len(keys)):
            suffix = keys[start:]
            if suffix in by_path and shapes[suffix] == leaf.shape:
                return by_path[suffix]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, state_shapes)


def state_shardings(config: LlamaConfig, optimizer, mesh: Mesh, rules=DEFAULT_RULES, *, params_shapes=None,
                    params_shardings=None, frozen_shardings=None) -> TrainState:
    """TrainState of NamedShardings. By default the trained tree is the whole model (`param_shardings`);
    pass `params_shapes`/`params_shardings` (and `frozen_shardings`) for another trained tree (LoRA)."""
    from llama_jax.model.transformer import param_shapes

    if params_shardings is None:
        params_shapes, params_shardings = param_shapes(config), param_shardings(config, mesh, rules)
    elif params_shapes is None:
        raise ValueError("state_shardings: params_shardings given without params_shapes")
    return TrainState(step=replicated(mesh), params=params_shardings,
                      opt_state=opt_state_shardings(optimizer, params_shapes, params_shardings, mesh),
                      frozen=frozen_shardings)


def init_train_state(params, optimizer, shardings: TrainState, frozen=None) -> TrainState:
    """A TrainState at step 0 around `params` (already placed, e.g. from `init_sharded_params` or a
    checkpoint); the optimizer state is created directly in its shardings."""
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state, frozen=frozen)


# ---------------------------------------------------------------------------------------------- loss
def split_batch(batch: Batch) -> dict:
    """Normalise a batch to {inputs, targets, positions|None, segment_ids|None, loss_mask} (see module doc)."""
    if "inputs" in batch:
        if "targets" not in batch:
            raise KeyError(f"batch has 'inputs' but no 'targets'; keys are {sorted(batch)}")
        inputs, targets = batch["inputs"], batch["targets"]
    elif "tokens" in batch:
        inputs, targets = batch["tokens"][:, :-1], batch["tokens"][:, 1:]
    else:
        raise KeyError(f"batch needs 'inputs' and 'targets' (or 'tokens' [B, T+1]); keys are {sorted(batch)}")
    segment_ids = batch.get("segment_ids")
    if "loss_mask" in batch:
        weights = batch["loss_mask"].astype(jnp.float32)
    elif segment_ids is not None:
        weights = (segment_ids != 0).astype(jnp.float32)
    else:
        weights = jnp.ones(targets.shape, jnp.float32)
    out = dict(inputs=inputs, targets=targets, positions=batch.get("positions"), segment_ids=segment_ids,
               loss_mask=weights)
    for name, x in out.items():
        if x is not None and x.shape != inputs.shape:
            raise ValueError(f"batch: '{name}' has shape {tuple(x.shape)}, expected {tuple(inputs.shape)} like the "
                             "model inputs (with 'tokens' [B, T+1] the other arrays are [B, T])")
    return {**out, **_image_arrays(batch, inputs.shape)}


IMAGE_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")


def _image_arrays(batch: Batch, shape) -> dict:
    """The batch's image arrays (module doc), all four or none; {} for a text batch."""
    given = [k for k in IMAGE_KEYS if batch.get(k) is not None]
    if not given:
        return {}
    if len(given) < len(IMAGE_KEYS):
        raise ValueError(f"batch: image arrays {given} without {[k for k in IMAGE_KEYS if k not in given]}; "
                         f"a batch with images has all of {list(IMAGE_KEYS)}")
    out = {k: batch[k] for k in IMAGE_KEYS}
    mask = out["cross_attention_mask"]
    if mask.ndim == 4 and mask.shape[1] == shape[1] + 1:  # aligned with `tokens` [B, T+1]
        out["cross_attention_mask"] = mask = mask[:, :-1]
    for k, x in out.items():
        if x.shape[0] != shape[0]:
            raise ValueError(f"batch: '{k}' has {x.shape[0]} rows, expected {shape[0]} like the model inputs")
    if mask.ndim != 4 or mask.shape[1] != shape[1]:
        raise ValueError(f"batch: 'cross_attention_mask' has shape {tuple(mask.shape)}, expected [B, T, images, "
                         f"tiles] with T = {shape[1]} like the model inputs")
    return out


def _mean(total, weight):
    """total / weight, and 0 for a batch with no weighted token (rather than NaN)."""
    return jnp.where(weight > 0, total / jnp.where(weight > 0, weight, 1.0), 0.0)


def cross_entropy_sum(logits: jax.Array, targets: jax.Array, weights: jax.Array):
    """logits [B, T, V] float32, targets [B, T], weights [B, T] -> (sum of weighted CE, sum of weights)."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum((log_z - target_logit) * weights), jnp.sum(weights)


def loss_fn(params, batch: Batch, config: LlamaConfig):
    """Weighted-mean next-token cross entropy of `batch` (float32) -> (loss, (sum of CE, sum of weights))."""
    b = split_batch(batch)
    logits = apply_model(config, params, b)  # [B, T, V] float32
    targets, weights = b["targets"], b["loss_mask"]
    if config.vision is not None:  # <|image|> (an id past the head's vocab rows) is an input, never a target
        image = targets >= config.vocab_size
        targets, weights = jnp.where(image, 0, targets), jnp.where(image, 0.0, weights)
    ce_sum, weight_sum = cross_entropy_sum(logits, targets, weights)
    return _mean(ce_sum, weight_sum), (ce_sum, weight_sum)


def apply_model(config: LlamaConfig, params, b: dict):
    """The model's float32 logits [B, T, V] for a split batch `b`: Llama, or for a vision config VisionLlama with
    the batch's images (none: its text model), gradients stopped at the frozen image encoder and projector
    (so their backward pass is never built; optim.freeze_image_encoder gives them no update)."""
    if config.vision is None:
        return Llama(config).apply({"params": params}, b["inputs"], positions=b["positions"],
                                   segment_ids=b["segment_ids"])
    from llama_jax.model.mllama import VisionLlama
    from llama_jax.training.optim import FROZEN_IMAGE_PARAMS

    params = {k: jax.lax.stop_gradient(v) if k in FROZEN_IMAGE_PARAMS else v for k, v in params.items()}
    return VisionLlama(config).apply({"params": params}, b["inputs"], positions=b["positions"],
                                     segment_ids=b["segment_ids"], **{k: b.get(k) for k in IMAGE_KEYS})


class Objective:
    """What a step minimises. `sums(model_params, frozen, batch)` -> (total, weight, {name: sum}) on one
    (micro-)batch, `batch` as `split_batch` returns it; the loss is total / weight over the whole batch and
    each named metric is its sum / weight. `group`: rows that must stay in one micro-batch (2 for DPO's
    chosen/rejected pairs)."""

    group = 1

    def __init__(self, config: LlamaConfig):
        self.config = config

    def sums(self, model_params, frozen, batch: dict):
        _, (ce_sum, weight_sum) = loss_fn(model_params, batch, self.config)
        return ce_sum, weight_sum, {}


# ---------------------------------------------------------------------------------------------- steps
def _micro_batches(batch: dict, k: int, group: int = 1) -> dict:
    """[B, ...] -> [k, B/k, ...] with micro-batch i = rows i, i+k, i+2k, ... (with `group` g: groups of g
    consecutive rows, taken the same way): every device keeps contributing its own rows to every micro-batch
    (a contiguous split would leave most devices idle per micro-batch)."""

    def split(x):
        if x.shape[0] % (k * group):
            raise ValueError(f"gradient accumulation: batch size {x.shape[0]} is not a multiple of "
                             f"accum_steps={k}" + (f" x {group} rows per group" if group > 1 else ""))
        x = x.reshape((x.shape[0] // (k * group), k, group) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1).reshape((k, x.shape[0] * group) + x.shape[3:])

    return {name: split(x) for name, x in batch.items() if x is not None}


class MeshFunction:
    """A jitted function that always traces and runs inside `use_mesh(mesh, rules)` (the model's logical
    activation constraints need the mesh and rules in context; `jax.set_mesh` cannot be entered under jit).
    `.jitted` is the underlying jax.jit object; `.lower(...)` lowers it in the mesh context."""

    def __init__(self, jitted, mesh: Mesh, rules, batch_arg: Optional[int] = None):
        self.jitted, self.mesh, self.rules, self.batch_arg = jitted, mesh, rules, batch_arg

    def __call__(self, *args):
        if self.batch_arg is not None:  # a clear error instead of jax's about uneven shardings
            for name, x in args[self.batch_arg].items():
                if x is not None:
                    check_batch_size(x.shape[0], self.mesh, self.rules, f"batch['{name}']")
        with use_mesh(self.mesh, self.rules):
            return self.jitted(*args)

    def lower(self, *args):
        with use_mesh(self.mesh, self.rules):
            return self.jitted.lower(*args)


def identity_combine(params, frozen):
    return params


def make_train_step(config: LlamaConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules=DEFAULT_RULES, *, shardings: Optional[TrainState] = None,
                    schedule: Optional[Callable] = None, accum_steps: int = 1,
                    combine: Callable = identity_combine, donate: bool = True,
                    objective: Optional[Objective] = None) -> MeshFunction:
    """`step(state, batch) -> (new_state, metrics)`, jitted with explicit shardings and the state donated.

    `batch`: dict of [B, T] arrays (module doc), sharded over the batch axes (`sharding.batch_sharding`).
    `accum_steps` = k splits the batch into k micro-batches run one after the other (lax.scan) with summed
    gradients: the same update as one batch of B, with the activation memory of B/k.
    `shardings`: the state's shardings (default `state_shardings(config, optimizer, mesh, rules)`).
    `schedule`: the learning-rate schedule given to the optimizer, to report `learning_rate`.
    `combine(params, frozen)` -> the model's parameter tree (default: params itself).
    `objective`: what is minimised (default: next-token cross entropy, `Objective`).
    metrics (replicated float32 scalars): loss, grad_norm (before clipping), learning_rate (if schedule),
    tokens (sum of loss weights; for DPO, pairs), and the objective's own (mean over the batch).
    """
    if accum_steps < 1:
        raise ValueError(f"make_train_step: accum_steps={accum_steps}, expected >= 1")
    shardings = shardings or state_shardings(config, optimizer, mesh, rules)
    data_sharding = batch_sharding(mesh, rules)
    objective = objective or Objective(config)

    def sums(params, frozen, micro):
        total, weight, extra = objective.sums(combine(params, frozen), frozen, micro)
        return total, (weight, extra)

    grad_of_sum = jax.value_and_grad(sums, has_aux=True)

    def step(state: TrainState, batch: Batch):
        batch = split_batch(batch)
        if accum_steps == 1:
            (ce_sum, (weight_sum, extra)), grads = grad_of_sum(state.params, state.frozen, batch)
        else:
            def body(carry, micro):
                micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, data_sharding), micro)
                (ce, (w, e)), g = grad_of_sum(state.params, state.frozen, micro)
                return jax.tree.map(jnp.add, carry, (ce, w, e, g)), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            zeros = jax.lax.with_sharding_constraint(zeros, shardings.params)
            micros = _micro_batches(batch, accum_steps, objective.group)
            extra0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(
                lambda m: sums(state.params, state.frozen, m)[1][1], jax.tree.map(lambda x: x[0], micros)))
            init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), extra0, zeros)
            (ce_sum, weight_sum, extra, grads), _ = jax.lax.scan(body, init, micros)
        grads = jax.tree.map(lambda g: _mean(g.astype(jnp.float32), weight_sum), grads)
        # The norm in float32 even when the params (and so the update) are bf16.
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": _mean(ce_sum, weight_sum), "grad_norm": grad_norm, "tokens": weight_sum,
                   **{name: _mean(v, weight_sum) for name, v in extra.items()}}
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, frozen=state.frozen)
        return new_state, metrics

    jitted = jax.jit(step, in_shardings=(shardings, data_sharding), out_shardings=(shardings, replicated(mesh)),
                     donate_argnums=(0,) if donate else ())
    return MeshFunction(jitted, mesh, rules, batch_arg=1)


def make_eval_step(config: LlamaConfig, mesh: Mesh, rules=DEFAULT_RULES, *, params_shardings=None,
                   combine: Callable = identity_combine, frozen_shardings=None,
                   objective: Optional[Objective] = None) -> MeshFunction:
    """`eval_step(params, frozen, batch) -> {"loss", "tokens", ...}` (the objective's weighted-mean loss and
    metrics, default next-token CE; no update, no donation)."""
    params_shardings = params_shardings or param_shardings(config, mesh, rules)
    objective = objective or Objective(config)

    def step(params, frozen, batch):
        total, weight, extra = objective.sums(combine(params, frozen), frozen, split_batch(batch))
        return {"loss": _mean(total, weight), "tokens": weight, **{k: _mean(v, weight) for k, v in extra.items()}}

    jitted = jax.jit(step, in_shardings=(params_shardings, frozen_shardings, batch_sharding(mesh, rules)),
                     out_shardings=replicated(mesh))
    return MeshFunction(jitted, mesh, rules, batch_arg=2)


def make_forward(config: LlamaConfig, mesh: Mesh, rules=DEFAULT_RULES, *, params_shardings=None) -> MeshFunction:
    """`forward(params, batch) -> logits` [B, T, V] float32, sharded as the rules place "batch" and
    "act_vocab". `batch` has `inputs` (or `tokens`) [B, T] and optionally `positions`, `segment_ids`."""
    params_shardings = params_shardings or param_shardings(config, mesh, rules)
    data_sharding = batch_sharding(mesh, rules)
    logits_sharding = batch_sharding(mesh, rules, ("batch", "length", "act_vocab"), (None, None, config.vocab_size))

    def forward(params, batch):
        inputs = batch["inputs"] if "inputs" in batch else batch["tokens"]
        b = {"inputs": inputs, "positions": batch.get("positions"), "segment_ids": batch.get("segment_ids"),
             **{k: batch.get(k) for k in IMAGE_KEYS}}
        return apply_model(config, params, b)

    jitted = jax.jit(forward, in_shardings=(params_shardings, data_sharding), out_shardings=logits_sharding)
    return MeshFunction(jitted, mesh, rules, batch_arg=1)
