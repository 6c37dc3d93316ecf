"""The optimizer of a run: learning-rate schedule, weight-decay mask, AdamW after clipping.

`build_optimizer(run_config)` is the one place a RunConfig's `optim` section becomes an optax optimizer; the
trainer (training/loop.py) and the ahead-of-time compile (aot/train_report.py) both call it, so what `--aot`
compiles is what `train.py` runs.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import optax


def build_optimizer(cfg) -> Tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule) of a RunConfig: `make_schedule` over cfg.steps and `make_optimizer` with the
    settings of cfg.optim. The schedule is also returned so the train step can report the learning rate."""
    o = cfg.optim
    schedule = make_schedule(o.lr, o.warmup_steps, cfg.steps, o.min_lr_ratio)
    optimizer = make_optimizer(schedule, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                               clip_norm=o.clip_norm)
    return freeze_image_encoder(optimizer), schedule


def make_schedule(peak_lr: float, warmup_steps: int, total_steps: int, end_lr_ratio: float = 0.1) -> optax.Schedule:
    """Learning rate of update number `step` (0-based): linear warmup peak_lr * (step + 1) / warmup_steps (so
    the first update is not wasted at lr 0), then cosine decay to `end_lr_ratio * peak_lr` at `total_steps`,
    constant after."""
    # Why not optax.warmup_cosine_decay_schedule: its warmup is init + (peak - init) * step / warmup, peak only
    # at step `warmup` where its cosine starts; ours reaches peak one update earlier and then starts the
    # cosine at peak, so no choice of its arguments gives this curve. Joining optax.linear_schedule(peak/w,
    # peak, w - 1) and optax.cosine_decay_schedule(peak, total - w, alpha=end_lr_ratio) gives the same curve
    # in exact arithmetic, but its float32 rounding differs (up to ~300 ulps in a 2000-step warmup, tens in the
    # cosine), which would change every run's numbers and the continuation of runs checkpointed before. So
    # this is written out; tests/test_train.py checks it against that optax composition.
    if total_steps <= 0 or warmup_steps < 0 or peak_lr < 0:
        raise ValueError(f"make_schedule: expected peak_lr >= 0, total_steps > 0 and warmup_steps >= 0, found "
                         f"peak_lr={peak_lr}, total_steps={total_steps}, warmup_steps={warmup_steps}")
    end_lr = peak_lr * end_lr_ratio

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak_lr * (step + 1.0) / max(warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
        cosine = end_lr + (peak_lr - end_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup_steps, warm, cosine)

    return schedule


def decay_mask(params, decay_embeddings: bool = False):
    """Tree of bools: True where weight decay applies. Norm scales never decay (they are gains around 1);
    the token embedding decays only when `decay_embeddings`. Works on any nested-dict tree (e.g. LoRA)."""

    def one(path, _):
        names = [str(getattr(k, "key", k)) for k in path]
        if any(n.endswith("norm") for n in names):
            return False
        if "embed" in names and not decay_embeddings:
            return False
        return True

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(learning_rate, *, weight_decay: float = 0.1, b1: float = 0.9, b2: float = 0.95,
                   eps: float = 1e-8, clip_norm: Optional[float] = 1.0, decay_embeddings: bool = False,
                   mu_dtype=None) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay, masked by `decay_mask`) after global-norm clipping to `clip_norm`.

    `learning_rate` is a float or a schedule (see `make_schedule`). `mu_dtype` sets the first-moment dtype
    (default: the parameters' dtype, i.e. float32 with float32 master weights).
    """
    adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mu_dtype=mu_dtype,
                        mask=lambda p: decay_mask(p, decay_embeddings))
    if clip_norm is None or clip_norm <= 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)


# Top-level subtrees of a Llama 3.2 Vision model that fine-tuning leaves as they are: the image encoder and the
# projector into the text width (the text side, self and cross-attention layers, is trained).
FROZEN_IMAGE_PARAMS = ("vision", "projector")


def has_image_encoder(tree) -> bool:
    return isinstance(tree, dict) and any(k in tree for k in FROZEN_IMAGE_PARAMS)


def freeze_image_encoder(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` on the text side of a vision model's tree, and no update (and no optimizer state: no Adam
    moments for the ~0.9B encoder weights of 11B) for FROZEN_IMAGE_PARAMS. Why a mask rather than LoRA: the
    brief is a full fine-tune of the text side; LoRA runs already train only adapters on the text layers (its
    base, encoder included, is frozen), and this keeps checkpoints, export and resume as for text models. The
    loss (training/step.py) also stops gradients at these weights, so the encoder's backward pass is never
    computed. A tree without them (a text model, LoRA adapters) gets `inner` unchanged, state included, so
    text runs and their checkpoints are exactly as before. Clipping inside `inner` sees the text side only."""
    labels = lambda tree: {k: jax.tree.map(lambda _: "frozen" if k in FROZEN_IMAGE_PARAMS else "train", v)  # noqa: E731
                           for k, v in tree.items()}
    masked = optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()}, labels)

    def init(params):
        return masked.init(params) if has_image_encoder(params) else inner.init(params)

    def update(updates, state, params=None):
        if has_image_encoder(updates):
            return masked.update(updates, state, params)
        return inner.update(updates, state, params)

    return optax.GradientTransformation(init, update)
