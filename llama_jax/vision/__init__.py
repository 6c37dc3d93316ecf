"""vision: Llama 3.2 Vision's inputs, without transformers (the encoder itself is in model/).

    preprocess.py   preprocess(images, config): PIL images / paths -> pixel_values, aspect_ratio_ids,
                    aspect_ratio_mask, num_tiles (as MllamaImageProcessor); ImageSettings (preprocessor_config.json)
    masks.py        cross_attention_mask from the <|image|> token positions (as MllamaProcessor)

Imports only llama_jax.config / llama_jax.errors from the package.
"""

from llama_jax.vision.masks import check_image_counts, cross_attention_mask, image_spans
from llama_jax.vision.preprocess import ImageSettings, load_image, preprocess

__all__ = ["ImageSettings", "check_image_counts", "cross_attention_mask", "image_spans", "load_image", "preprocess"]
