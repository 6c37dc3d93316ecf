"""The image encoder's inputs (llama_jax.model.vision): arrays of the wrong shape, images for a text model."""

import numpy as np

from hostile import Case


def _states(preset: str, tiles: int = 4, ids_shape=(1, 1), mask_shape=(1, 1, 4), size: int = 28):
    from llama_jax.config import LlamaConfig
    from llama_jax.model.vision import cross_attention_states

    config = LlamaConfig.from_preset(preset)
    pixels = np.zeros((1, 1, tiles, 3, size, size), np.float32)
    return cross_attention_states({}, config, pixels, np.ones(ids_shape, np.int32), np.ones(mask_shape, np.int32))


CASES = [
    Case("pixel_values with fewer tiles than max_num_tiles", lambda tmp: _states("tiny-vision", tiles=2),
         r"pixel_values has shape \[1, 1, 2, 3, 28, 28\], expected \[batch, images, 4, 3, 28, 28\]"),
    Case("pixel_values of another image size", lambda tmp: _states("tiny-vision", size=56),
         r"pixel_values has shape .*expected \[batch, images, 4, 3, 28, 28\]"),
    Case("aspect_ratio_ids not [batch, images]", lambda tmp: _states("tiny-vision", ids_shape=(1, 2)),
         r"aspect_ratio_ids has shape \[1, 2\], expected \[1, 1\]"),
    Case("aspect_ratio_mask not [batch, images, tiles]", lambda tmp: _states("tiny-vision", mask_shape=(1, 4)),
         r"aspect_ratio_mask has shape \[1, 4\], expected \[1, 1, 4\]"),
    Case("images for a text-only model", lambda tmp: _states("tiny"), r"text-only model"),
]
