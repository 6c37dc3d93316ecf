"""`python -m llama_jax.model [PRESET]`: the parameter spec as a table for a preset (default llama3.1-8b)."""

import sys

from llama_jax.config import LlamaConfig
from llama_jax.model.spec import PARAM_LAYOUT, describe

preset = sys.argv[1] if len(sys.argv) > 1 else "llama3.1-8b"
print(f"{PARAM_LAYOUT} for {preset}:\n{describe(LlamaConfig.from_preset(preset))}")
