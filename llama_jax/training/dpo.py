"""Direct Preference Optimization (Rafailov et al. 2023): train on (prompt, chosen, rejected) pairs against a
frozen reference model.

Legend: P pairs, T sequence length, V vocab.

A DPO batch holds both responses of each pair, interleaved: rows 2p (chosen) and 2p+1 (rejected), each the
prompt followed by the response (training/preference_data.py writes them; `loss_mask` marks the response's
tokens). For a sequence y the log-probability log pi(y | x) is the sum of its response tokens' log-probs.
With policy pi and reference pi_ref:

    reward(y)  = beta * (log pi(y|x) - log pi_ref(y|x))
    loss       = -log sigmoid(reward(chosen) - reward(rejected)), averaged over pairs

The reference is the frozen tree (`TrainState.frozen`): with LoRA the base without its adapters (no second
copy of the weights), for full fine-tuning a copy of the starting weights. Its log-probs are computed in the
same step from the same batch, under stop_gradient.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from llama_jax.config import LlamaConfig
from llama_jax.model.transformer import Llama
from llama_jax.training.step import Objective

METRICS = ("reward_margin", "reward_accuracy", "logps_chosen", "logps_rejected", "reward_chosen",
           "reward_rejected")


def sequence_logps(params, batch: dict, config: LlamaConfig) -> jax.Array:
    """Sum over each row of the masked next-token log-probs: batch (split_batch form) of [R, T] -> [R] float32."""
    logits = Llama(config).apply({"params": params}, batch["inputs"], positions=batch["positions"],
                                 segment_ids=batch["segment_ids"]).astype(jnp.float32)  # [R, T, V]
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [R, T]
    target = jnp.take_along_axis(logits, batch["targets"][..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum((target - log_z) * batch["loss_mask"], axis=-1)


def pair_terms(policy: jax.Array, reference: jax.Array, beta: float) -> dict:
    """Per-pair DPO terms from per-row log-probs [2P] (chosen, rejected interleaved) -> dict of [P]."""
    pc, pr = policy[0::2], policy[1::2]
    rc, rr = reference[0::2], reference[1::2]
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    margin = chosen - rejected
    return {"loss": -jax.nn.log_sigmoid(margin), "reward_margin": margin,
            "reward_accuracy": (margin > 0).astype(jnp.float32), "logps_chosen": pc, "logps_rejected": pr,
            "reward_chosen": chosen, "reward_rejected": rejected}


class DPO(Objective):
    """The DPO objective for `training.step.make_train_step` (sums over pairs; weight = number of pairs)."""

    group = 2  # a pair's two rows stay in one micro-batch

    def __init__(self, config: LlamaConfig, beta: float):
        super().__init__(config)
        self.beta = float(beta)

    def sums(self, model_params, frozen, batch: dict):
        policy = sequence_logps(model_params, batch, self.config)
        reference = jax.lax.stop_gradient(sequence_logps(frozen, batch, self.config))
        terms = pair_terms(policy, reference, self.beta)
        pairs = jnp.asarray(policy.shape[0] // 2, jnp.float32)
        return jnp.sum(terms.pop("loss")), pairs, {k: jnp.sum(v) for k, v in terms.items()}


def objective(cfg, config: LlamaConfig) -> Optional[Objective]:
    """The run's objective for make_train_step / make_eval_step: DPO for objective=dpo, else None (SFT)."""
    return DPO(config, cfg.dpo.beta) if cfg.objective == "dpo" else None


def dataset_fn(cfg) -> Callable:
    """The run's `make_dataset(path, split, seq_len, global_batch, seed, rows, shuffle=...)`: preference pairs
    for objective=dpo, packed sequences otherwise."""
    from llama_jax.training import data as data_lib
    from llama_jax.training import preference_data

    return preference_data.make_dataset if cfg.objective == "dpo" else data_lib.make_dataset
