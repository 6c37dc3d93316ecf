"""Analytic FLOP counts and peak FLOP/s, for MFU (model FLOPs utilisation).

MFU = (model FLOPs per token x tokens per second) / (peak FLOP/s per device x devices). Model FLOPs count
only the useful work of the forward and backward passes (no rematerialisation), as in the PaLM paper.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from llama_jax.config import LlamaConfig
from llama_jax.model import spec


def param_count(config: LlamaConfig, names: Optional[Sequence[str]] = None) -> int:
    """Parameters of the spec's tensors `names` ("layers/attn/q", ...; default: every tensor of the model)."""
    chosen = spec.params(config) if names is None else (spec.get(n, config) for n in names)
    return sum(math.prod(p.full_shape(config)) for p in chosen if p.present(config))


def num_params(config: LlamaConfig, include_embedding: bool = True) -> int:
    """All parameters; without the embedding table, an untied output head still counts (it is a real matmul)."""
    return param_count(config) - (0 if include_embedding else param_count(config, ["embed/embedding"]))


def matmul_params(config: LlamaConfig) -> int:
    """Parameters that take part in a matmul per token: attention and MLP projections and the output head
    (the tied embedding counts once, as the head; the embedding lookup and the norms are not matmuls)."""
    weights = [p.name for p in spec.params(config) if p.inputs]
    tied_head = ["embed/embedding"] if config.tie_word_embeddings else []
    return param_count(config, weights + tied_head)


def train_flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """FLOPs of one training token (forward + backward): 6 * matmul params + causal attention.

    Attention: QK^T and PV are 2 matmuls of 2*N*H FLOPs per key each, forward; x3 for the backward; the
    causal mask halves the average number of keys to seq_len/2 -> 6 * L * N * H * seq_len.
    """
    attention = 6 * config.num_layers * config.num_heads * config.head_dim * seq_len
    return 6.0 * matmul_params(config) + attention


# Dense bf16 peak FLOP/s per device (one chip for TPUs; SXM parts for GPUs), from the vendors' data sheets.
PEAK_FLOPS = {
    "tpu v2": 45e12, "tpu v3": 123e12, "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12,
    "tpu v5p": 459e12, "tpu v5": 459e12, "tpu v6 lite": 918e12, "tpu v6e": 918e12, "tpu7x": 2307e12,
    "h200": 989e12, "h100": 989e12, "a100": 312e12, "l4": 121e12, "a10g": 70e12, "v100": 125e12,
}


def peak_flops(device_kind: str) -> Optional[float]:
    """Peak bf16 FLOP/s of one device of `device_kind` (jax's `device.device_kind`), None if unknown (CPU)."""
    kind = device_kind.lower()
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):  # longest first: "tpu v5 lite" before "tpu v5"
        if name in kind:
            return PEAK_FLOPS[name]
    return None
