"""llama_jax: the Llama family in JAX/Flax — model, sharding, conversion, training and sampling.

The public names below load on first use (PEP 562), so `import llama_jax.cpu.host_memory` — which the command lines
run before re-executing themselves with huge pages — does not import jax and flax first.
"""

import importlib

_EXPORTS = {
    "LlamaConfig": "llama_jax.config", "RopeScaling": "llama_jax.config",
    "LlamaJaxError": "llama_jax.errors", "ConfigError": "llama_jax.errors",
    "Llama": "llama_jax.model", "init_cache": "llama_jax.model", "init_params": "llama_jax.model",
    "param_shapes": "llama_jax.model", "Sampler": "llama_jax.sampling", "load_tokenizer": "llama_jax.text.tokenizer",
    "load": "llama_jax.io.loading", "VisionLlama": "llama_jax.model.mllama",
}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name == "vision":  # `llama_jax.vision.preprocess(...)` after a bare `import llama_jax`
        return importlib.import_module("llama_jax.vision")
    raise AttributeError(f"module 'llama_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
