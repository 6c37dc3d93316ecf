"""Placeholder so the table is never empty; wings add cases_<wing>.py files beside it."""

from hostile import Case
from hostile.fixtures import write_json


def _list_config(tmp):
    from llama_jax.config import LlamaConfig
    return LlamaConfig.from_hf(str(write_json(tmp / "config.json", [1, 2])))


CASES = [Case("config.json is a list", _list_config, r"config\.json")]
