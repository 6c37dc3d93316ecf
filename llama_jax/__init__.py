"""llama_jax: the Llama family in JAX/Flax — model, sharding, conversion, training and sampling."""

from llama_jax.config import ConfigError, LlamaConfig, RopeScaling
from llama_jax.model import Llama, init_cache, init_params, param_shapes
from llama_jax.sampling import Sampler
from llama_jax.tokenizer import load_tokenizer
from llama_jax.loading import load

__all__ = ["ConfigError", "LlamaConfig", "RopeScaling", "Llama", "init_cache", "init_params", "param_shapes", "load",
           "Sampler", "load_tokenizer"]
__version__ = "0.1.0"
