"""Helpers shared by tests: tiny random transformers Llama models saved with save_pretrained."""

from __future__ import annotations

import numpy as np


def make_hf_model(config, seed: int = 0):
    """A random transformers LlamaForCausalLM (float32) with the same architecture as `config`."""
    import torch
    import transformers

    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig(**config.to_hf_dict())
    model = transformers.LlamaForCausalLM(hf_config).eval()
    # transformers initialises norms to 1; randomise them so a swapped norm cannot pass unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()
