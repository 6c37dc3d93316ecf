"""The attention setting (LlamaConfig.attention, the run config's model.attention): unknown kinds are named."""

from hostile import Case


def _config(tmp):
    from llama_jax.config import LlamaConfig
    return LlamaConfig.from_preset("tiny", attention="flash")


def _run_config(tmp):
    from llama_jax.training import run_config
    from llama_jax.training.setup import model_config
    return model_config(run_config.build("", ["model.preset=tiny", "model.attention=Splash"]))


CASES = [
    Case("LlamaConfig attention='flash'", _config, r"attention='flash'.*'auto', 'xla', 'splash'"),
    Case("run config model.attention=Splash", _run_config, r"attention='Splash'.*expected one of"),
]
