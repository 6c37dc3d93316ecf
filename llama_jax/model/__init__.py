"""The model: the parameter spec (`spec`), its layers, attention and RoPE, and the scanned Llama decoder."""

from llama_jax.model.spec import PARAM_LAYOUT  # noqa: F401
from llama_jax.model.transformer import (Llama, init_cache, init_params, logical_axes,  # noqa: F401
                                         param_shapes)
