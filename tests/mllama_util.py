"""Helpers shared by the Llama 3.2 Vision (Mllama) tests: a random tiny transformers Mllama model whose gates,
norms and tile/positional embeddings are randomized (transformers starts every gate at zero, which would hide
the cross-attention layers and the tile embeddings), its state dict under the released checkpoint names, and
our parameter tree built from it through the spec.

    model = make_hf_mllama(config, seed=0)     # MllamaForConditionalGeneration, float32, eval mode
    params = params_from_hf(model, config)     # our tree (numpy float32), every spec.params(config) row
    pixel_values, ids, mask = random_images(config, [[2, 4], [1]], seed=0)  # tiles per image, per row
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

# transformers 5 keeps Mllama's modules under model.* in memory and writes the released layout to disk.
_IN_MEMORY_TO_RELEASED = (("model.vision_model.", "vision_model."),
                          ("model.multi_modal_projector.", "multi_modal_projector."),
                          ("model.language_model.", "language_model.model."),
                          ("lm_head.", "language_model.lm_head."))


def make_hf_mllama(config, seed: int = 0):
    """A random transformers MllamaForConditionalGeneration (float32, eval) with `config`'s architecture and
    every gate uniform in (-1, 1), norms 1 + N(0, 0.1), norm biases and tile/positional embeddings N(0, 0.5)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.MllamaForConditionalGeneration(transformers.MllamaConfig(**config.to_hf_dict())).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate", "gate_attn", "gate_ffn")):
                p.uniform_(-1.0, 1.0)
            elif "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif ("norm" in name and name.endswith(".bias")) or "positional_embedding" in name:
                p.normal_(0.0, 0.5)
    return model


def released_state_dict(model) -> Dict[str, np.ndarray]:
    """{released checkpoint name (language_model.model.layers.N..., vision_model..., multi_modal_projector...):
    float32 numpy array} of a transformers Mllama model."""
    out = {}
    for name, tensor in model.state_dict().items():
        for old, new in _IN_MEMORY_TO_RELEASED:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        out[name] = tensor.detach().float().numpy()
    return out


def params_from_hf(model_or_state, config) -> dict:
    """Our full parameter tree (numpy float32) from a transformers Mllama model or a released-name state dict,
    through the spec (stacked rows gathered in `hf_layers` order); every checkpoint tensor must be used."""
    from llama_jax.model import spec

    state = model_or_state if isinstance(model_or_state, dict) else released_state_dict(model_or_state)
    used, pairs = set(), []
    for p in spec.params(config):
        names = [p.hf_name(i) for i in p.hf_layers(config)]
        arrays = [p.from_hf(state[n], config) for n in names]
        used.update(names)
        pairs.append((p.path, np.stack(arrays) if p.stacked else arrays[0]))
    unused = sorted(set(state) - used)
    assert not unused, f"checkpoint tensors the spec does not map: {unused[:5]}"
    return spec.nest(pairs)


def random_images(config, tiles: Sequence[Sequence[int]], seed: int = 0):
    """Processor-like arrays for rows of images with the given tile counts (rows padded to the most images):
    pixel_values [B, I, T, C, H, W] float32 N(0, 1), aspect_ratio_ids [B, I] (the id of the first supported
    ratio with that many tiles; 0 for a missing image), aspect_ratio_mask [B, I, T] (1 for real tiles; a
    missing image keeps tile 0 on, as MllamaImageProcessor does)."""
    v = config.vision
    rng = np.random.default_rng(seed)
    b, i = len(tiles), max(len(row) for row in tiles)
    pixels = np.zeros((b, i, v.max_num_tiles, v.num_channels, v.image_size, v.image_size), np.float32)
    ids = np.zeros((b, i), np.int64)
    mask = np.zeros((b, i, v.max_num_tiles), np.int64)
    mask[:, :, 0] = 1
    for r, row in enumerate(tiles):
        for k, n in enumerate(row):
            pixels[r, k, :n] = rng.standard_normal(pixels[r, k, :n].shape)
            ids[r, k] = 1 + next(j for j, (h, w) in enumerate(v.supported_aspect_ratios) if h * w == n)
            mask[r, k, :n] = 1
    return pixels, ids, mask
