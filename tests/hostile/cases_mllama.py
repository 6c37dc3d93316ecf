"""VisionLlama's inputs (llama_jax.model.mllama): a cross-attention mask or cache that does not fit the images,
images without their aspect-ratio ids, a text config. Traced only (jax.eval_shape): nothing compiles."""

import numpy as np

from hostile import Case


def _apply(preset: str = "tiny-vision", mask_shape=(1, 5, 1, 4), ids=True, cache_images=None):
    import jax

    from llama_jax.config import LlamaConfig
    from llama_jax.model import spec
    from llama_jax.model.mllama import VisionLlama
    from llama_jax.model.transformer import init_cache

    config = LlamaConfig.from_preset(preset)
    images = dict(pixel_values=np.zeros((1, 1, 4, 3, 28, 28), np.float32),
                  aspect_ratio_ids=np.ones((1, 1), np.int32) if ids else None,
                  aspect_ratio_mask=np.ones((1, 1, 4), np.int32), cross_attention_mask=np.ones(mask_shape, np.int32))
    cache = None if cache_images is None else init_cache(config, 1, 8, num_images=cache_images)
    extra = {} if cache is None else dict(cache=cache, cache_index=0)
    params = spec.param_shapes(config) if config.vision is not None else {}
    return jax.eval_shape(lambda p: VisionLlama(config).apply({"params": p}, np.zeros((1, 5), np.int32), **images,
                                                              **extra), params)


CASES = [
    Case("cross_attention_mask for more images than given", lambda tmp: _apply(mask_shape=(1, 5, 2, 4)),
         r"cross_attention_mask has shape \[1, 5, 2, 4\], expected \[1, 5, images, tiles\]"),
    Case("cross_attention_mask for fewer tokens than given", lambda tmp: _apply(mask_shape=(1, 3, 1, 4)),
         r"cross_attention_mask has shape \[1, 3, 1, 4\]"),
    Case("pixel_values without aspect_ratio_ids", lambda tmp: _apply(ids=False), r"without aspect_ratio_ids"),
    Case("a cache made for no images, given images", lambda tmp: _apply(cache_images=0),
         r"the cache holds 0 image tokens, the images give 20: .*num_images=1"),
    Case("a cache made for two images, given one", lambda tmp: _apply(cache_images=2),
         r"the cache holds 40 image tokens, the images give 20"),
    Case("VisionLlama with a text-only config", lambda tmp: _apply("tiny"), r"VisionLlama needs a vision config"),
]
