"""The decode attention setting (LlamaConfig.decode_attention; model/decode_kernel.py): unknown kinds, and the
paged kernel asked for where it cannot run, are named."""

from hostile import Case


def _kind(tmp):
    from llama_jax.config import LlamaConfig
    return LlamaConfig.from_preset("tiny", decode_attention="ragged")


def _per_layer(tmp):
    import jax
    from llama_jax.config import LlamaConfig
    from llama_jax.cpu.decode_layout import unstack_layers
    from llama_jax.model.transformer import init_params
    from llama_jax.sampling.program import generate_ids
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
                         decode_attention="paged")
    params = unstack_layers(init_params(config, jax.random.PRNGKey(0)))
    return generate_ids(params, config, [[1, 2]], max_new_tokens=1)


CASES = [
    Case("LlamaConfig decode_attention='ragged'", _kind, r"decode_attention='ragged'.*'auto', 'xla', 'paged'"),
    Case("decode_attention='paged' with per-layer parameters", _per_layer, r"decode_attention='paged' needs stacked"),
]
