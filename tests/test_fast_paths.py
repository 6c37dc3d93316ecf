"""The speed paths give the numbers of the plain formulas: hand-written backward passes (`layers.dense`,
`layers.swiglu`, `attention._attend`) against autodiff, and the CPU decoding layout (`cpu.decode_layout`: per-layer
parameters and caches) against the stacked model, with and without a KV cache and through the sampler."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import Llama, LlamaConfig, init_cache, init_params
from llama_jax.model.attention import _attend
from llama_jax.model.layers import dense, swiglu
from llama_jax.cpu.decode_layout import PerLayerLlama, init_per_layer_cache, unstack_layers


def _grads(f, *args):
    """Gradients of a random projection of f(*args), wrt every argument."""
    probe = jax.random.normal(jax.random.PRNGKey(9), jax.eval_shape(f, *args).shape, jnp.float32)
    return jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * probe), argnums=tuple(range(len(args))))(*args)


def _close(got, want, atol=2e-6):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=atol, rtol=1e-5)


def _plain_attend(q, k, v, mask):
    scores = jnp.einsum("BTKGH,BKHS->BKGTS", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    return jnp.einsum("BKGTS,BKSH->BTKGH", jax.nn.softmax(scores, axis=-1).astype(v.dtype), v)


@pytest.mark.parametrize("groups", [1, 3])
def test_attention_backward_equals_autodiff(groups):
    rng = np.random.RandomState(groups)
    b, t, s, k, h = 2, 5, 7, 2, 8
    q = jnp.asarray(rng.randn(b, t, k, groups, h), jnp.float32)
    key = jnp.asarray(rng.randn(b, k, h, s), jnp.float32)  # [B, K, H, S], as the cache stores keys
    value = jnp.asarray(rng.randn(b, k, s, h), jnp.float32)  # [B, K, S, H]
    mask = jnp.asarray(rng.rand(b, t, s) > 0.4).at[0, 1].set(False)  # row 1 of batch 0: nothing visible
    f = lambda q, key, value: _attend(q, key, value, mask)  # noqa: E731
    g = lambda q, key, value: _plain_attend(q, key, value, mask)  # noqa: E731
    np.testing.assert_allclose(f(q, key, value), g(q, key, value), atol=1e-6, rtol=1e-6)  # float rounding only
    _close(_grads(f, q, key, value), _grads(g, q, key, value))


@pytest.mark.parametrize("spec, x_shape, w_shape, kwargs", [
    ("BTD,DNH->BTNH", (3, 4, 6), (6, 2, 5), {}),
    ("BTNH,NHD->BTD", (3, 4, 2, 5), (2, 5, 6), {"contract": 2}),
    ("BTD,VD->BTV", (3, 4, 6), (9, 6), {"w_transposed": True, "out_dtype": jnp.float32}),
])
def test_dense_backward_equals_einsum(spec, x_shape, w_shape, kwargs):
    rng = np.random.RandomState(0)
    x, w = jnp.asarray(rng.randn(*x_shape), jnp.float32), jnp.asarray(rng.randn(*w_shape), jnp.float32)
    ours = lambda x, w: dense(x, w, **kwargs)  # noqa: E731
    plain = lambda x, w: jnp.einsum(spec, x, w)  # noqa: E731
    np.testing.assert_allclose(ours(x, w), plain(x, w), atol=1e-6)
    _close(_grads(ours, x, w), _grads(plain, x, w), atol=1e-5)


def test_dense_keeps_bfloat16_gradients():
    x, w = jnp.ones((2, 3, 4), jnp.bfloat16), jnp.ones((5, 4), jnp.bfloat16)
    dx, dw = _grads(lambda x, w: dense(x, w, w_transposed=True, out_dtype=jnp.float32), x, w)
    assert dx.dtype == dw.dtype == jnp.bfloat16


def test_swiglu_backward_equals_autodiff():
    rng = np.random.RandomState(1)
    gate, up = jnp.asarray(rng.randn(3, 7), jnp.float32), jnp.asarray(rng.randn(3, 7), jnp.float32)
    _close(_grads(swiglu, gate, up), _grads(lambda g, u: nn.silu(g) * u, gate, up))


def test_unstacked_layers_equal_stacked():
    cfg = LlamaConfig.from_preset("tiny", num_kv_heads=1)
    params = init_params(cfg, jax.random.PRNGKey(0))
    split = unstack_layers(params)
    assert "layers" not in split and len([k for k in split if k.startswith("layers_")]) == cfg.num_layers
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 9)))
    model, per_layer_model = Llama(cfg), PerLayerLlama(cfg)
    np.testing.assert_allclose(per_layer_model.apply({"params": split}, tokens),
                               model.apply({"params": params}, tokens), atol=1e-5)
    with pytest.raises(ValueError, match="PerLayerLlama"):
        model.apply({"params": split}, tokens)
    cache = init_cache(cfg, 2, 12)
    want_logits, want_cache = model.apply({"params": params}, tokens, cache=cache, cache_index=0)
    got_logits, got_cache = per_layer_model.apply({"params": split}, tokens, cache=cache, cache_index=0)
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-5)
    for name in ("k", "v"):
        np.testing.assert_allclose(got_cache[name], want_cache[name], atol=1e-5)

    from llama_jax.sampling import generate_ids
    prompts = [[1, 5, 7], [3, 4]]
    assert generate_ids(split, cfg, prompts, max_new_tokens=5) == generate_ids(params, cfg, prompts, max_new_tokens=5)


@pytest.mark.parametrize("batch", [1, 2])  # batch 1: per-layer buffers drop the batch axis
def test_per_layer_cache_equals_stacked_cache(batch):
    cfg = LlamaConfig.from_preset("tiny", num_kv_heads=1)
    params = init_params(cfg, jax.random.PRNGKey(0))
    split = unstack_layers(params)
    model, per_layer_model = Llama(cfg), PerLayerLlama(cfg)
    rng = np.random.RandomState(3)
    prompt, step = (jnp.asarray(rng.randint(0, cfg.vocab_size, shape)) for shape in ((batch, 6), (batch, 1)))
    stacked, per_layer = init_cache(cfg, batch, 10), init_per_layer_cache(cfg, batch, 10)
    assert stacked["k"].shape[-2:] == (cfg.head_dim, 10) and stacked["v"].shape[-2:] == (10, cfg.head_dim)
    assert len(per_layer["k"]) == cfg.num_layers
    assert per_layer["k"][0].shape == stacked["k"].shape[2 if batch == 1 else 1:]
    for tokens, index in ((prompt, 0), (step, 6)):  # a prefill, then one decode step at slot 6
        want, stacked = model.apply({"params": params}, tokens, cache=stacked, cache_index=index)
        got, per_layer = per_layer_model.apply({"params": split}, tokens, cache=per_layer, cache_index=index)
        np.testing.assert_allclose(got, want, atol=1e-5)
        for name in ("k", "v"):
            np.testing.assert_allclose(jnp.stack(per_layer[name]).reshape(stacked[name].shape), stacked[name],
                                       atol=1e-5)
    assert float(jnp.abs(stacked["k"][..., 6]).max()) > 0 and float(jnp.abs(stacked["v"][..., 6, :]).max()) > 0
    assert float(jnp.abs(stacked["k"][..., 7:]).max()) == 0  # slot 6 written, later slots untouched
    with pytest.raises(ValueError, match="per-layer cache"):
        model.apply({"params": params}, step, cache=per_layer, cache_index=7)


def test_sampler_keeps_per_layer_weights_on_cpu():
    from llama_jax.sampling import Sampler

    class Tok:  # just enough tokenizer for generate_ids
        vocab_size, stop_ids = 16, ()

    cfg = LlamaConfig.from_preset("tiny")
    params = init_params(cfg, jax.random.PRNGKey(0))
    default, stacked = Sampler(cfg, params, Tok()), Sampler(cfg, params, Tok(), per_layer=False)
    assert "layers_0" in default.params and "layers" in stacked.params
    assert "qkv" in default.params["layers_0"]["attn"]  # the fused decoding layout
    prompts = [[1, 5, 7], [3, 4]]
    assert default.generate_ids(prompts, 6, temperature=0) == stacked.generate_ids(prompts, 6, temperature=0)


def test_fused_decoding_layout_equals_stacked():
    from llama_jax.model.quantize import QArray, quantize_params

    cfg = LlamaConfig.from_preset("tiny")
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.RandomState(4).randint(0, cfg.vocab_size, (2, 7)))
    model = Llama(cfg)
    for tree in (params, quantize_params(params)):  # float32 and int8 weights
        fused = unstack_layers(tree, fuse=True)
        attn, mlp = fused["layers_0"]["attn"], fused["layers_0"]["mlp"]
        assert sorted(attn) == ["o", "qkv"] and sorted(mlp) == ["down", "gate_up"]
        width = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        assert attn["qkv"].shape == (cfg.hidden_size, width)
        assert mlp["gate_up"].shape == (cfg.hidden_size, 2 * cfg.intermediate_size)
        assert isinstance(attn["qkv"], QArray) == (tree is not params)
        want, want_cache = model.apply({"params": tree}, tokens, cache=init_cache(cfg, 2, 9), cache_index=0)
        got, got_cache = PerLayerLlama(cfg).apply({"params": fused}, tokens, cache=init_per_layer_cache(cfg, 2, 9),
                                                  cache_index=0)
        np.testing.assert_allclose(got, want, atol=1e-5)
        np.testing.assert_allclose(jnp.stack(got_cache["v"]), want_cache["v"], atol=1e-5)


def test_unstack_layers_names_a_tree_without_layers():
    with pytest.raises(KeyError, match="stacked blocks"):
        unstack_layers({"embed": {}})


@pytest.mark.slow
def test_blocked_causal_attention_equals_one_block(monkeypatch):
    from llama_jax.model import attention

    cfg = LlamaConfig.from_preset("tiny", num_kv_heads=1)
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 40)))
    model = Llama(cfg)

    def run():
        logits, cache = model.apply({"params": params}, tokens, cache=init_cache(cfg, 2, 48), cache_index=0)
        grads = jax.grad(lambda p: model.apply({"params": p}, tokens).mean())(params)
        return logits, cache, grads

    want = run()
    monkeypatch.setattr(attention, "QUERY_CHUNK", 8)  # 40 tokens: five blocks, the last ones see more keys
    monkeypatch.setattr(attention, "CHUNKED_FROM", 16)
    got = run()
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, atol=1e-5)
