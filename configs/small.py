"""The CPU default (`python train.py` uses these values): the "small" preset on the built-in corpus."""

from llama_jax.training.run_config import RunConfig


def get_config() -> RunConfig:
    return RunConfig()
