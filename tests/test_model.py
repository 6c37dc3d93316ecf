"""Model-level checks that need no converter: cached decoding equals the full forward pass, packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import ConfigError, Llama, LlamaConfig, init_cache, init_params


@pytest.fixture(scope="module")
def gqa():
    cfg = LlamaConfig.from_preset("tiny", num_kv_heads=1)
    return cfg, init_params(cfg, jax.random.PRNGKey(0))


def test_cached_decoding_equals_full_forward(gqa):
    cfg, params = gqa
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 12)))
    full = Llama(cfg).apply({"params": params}, tokens)
    cache = init_cache(cfg, 2, 16)
    logits, cache = Llama(cfg).apply({"params": params}, tokens[:, :7], cache=cache, cache_index=0)
    steps = [logits]
    for i in range(7, 12):
        logits, cache = Llama(cfg).apply({"params": params}, tokens[:, i:i + 1], cache=cache, cache_index=i)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)


def test_packed_documents_do_not_see_each_other(gqa):
    cfg, params = gqa
    rng = np.random.RandomState(1)
    doc_a, doc_b, other = rng.randint(0, cfg.vocab_size, 5), rng.randint(0, cfg.vocab_size, 7), rng.randint(0, cfg.vocab_size, 5)
    model = Llama(cfg)

    def packed(first):
        tokens = jnp.asarray(np.concatenate([first, doc_b])[None])
        positions = jnp.asarray(np.concatenate([np.arange(5), np.arange(7)])[None])
        segments = jnp.asarray(np.array([1] * 5 + [2] * 7)[None])
        return model.apply({"params": params}, tokens, positions=positions, segment_ids=segments)

    alone = model.apply({"params": params}, jnp.asarray(doc_b[None]))
    with_a, with_other = packed(doc_a), packed(other)
    np.testing.assert_allclose(with_a[:, 5:], alone, atol=1e-5)
    np.testing.assert_allclose(with_other[:, 5:], alone, atol=1e-5)
    assert not np.allclose(with_a[:, :5], with_other[:, :5])


def test_remat_policies_give_same_gradients():
    cfg = LlamaConfig.from_preset("tiny")
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 8)))

    def grads(c):
        loss = lambda p: Llama(c).apply({"params": p}, tokens).mean()  # noqa: E731
        return jax.grad(loss)(params)

    reference = grads(cfg)
    for policy in ("full", "dots"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), reference,
                     grads(cfg.replace(remat=policy)))


@pytest.mark.parametrize("bad, message", [
    (dict(num_heads=6, num_kv_heads=4), "not a multiple of num_kv_heads=4"),
    (dict(hidden_size=0), "hidden_size=0"),
    (dict(head_dim=7), "even head dimension"),
    (dict(dtype="float64"), "dtype='float64'"),
    (dict(remat="sometimes"), "remat='sometimes'"),
    (dict(bos_token_id=999), "outside the vocabulary"),
])
def test_config_validation_names_the_value(bad, message):
    with pytest.raises(ConfigError, match=message):
        LlamaConfig.from_preset("tiny", **bad)


def test_unknown_preset_suggests_close_names():
    with pytest.raises(ConfigError, match="llama3.1-8b"):
        LlamaConfig.from_preset("llama3.1-8")


@pytest.mark.parametrize("tied", [False, True])
def test_spec_trees_equal_what_flax_builds(tied):
    """The spec states the layout once: its shapes, dtypes and logical axes are exactly the tree Flax's init
    creates (so sharding, conversion and checkpoints, which read the spec, describe the real model)."""
    import jax
    from jax.sharding import PartitionSpec

    from llama_jax.model import spec
    from llama_jax.model.transformer import traced_param_tree

    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=40, num_layers=3, num_heads=4,
                      num_kv_heads=2, head_dim=12, tie_word_embeddings=tied, param_dtype="bfloat16")
    shapes, axes = traced_param_tree(cfg)
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    assert jax.tree.structure(spec.param_shapes(cfg)) == jax.tree.structure(shapes)
    assert jax.tree.leaves(spec.param_shapes(cfg)) == jax.tree.leaves(shapes)
    assert jax.tree.structure(spec.logical_axes(cfg), is_leaf=is_spec) == jax.tree.structure(axes, is_leaf=is_spec)
    assert jax.tree.leaves(spec.logical_axes(cfg), is_leaf=is_spec) == jax.tree.leaves(axes, is_leaf=is_spec)
    assert ("lm_head" in shapes) == (not tied)


def test_spec_hf_transforms_round_trip_and_counts():
    import math

    import numpy as np

    from llama_jax.model import flops, spec

    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=40, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=12)
    rng = np.random.default_rng(0)
    for p in spec.params(cfg):
        w = rng.standard_normal(p.hf_shape(cfg)).astype(np.float32)
        ours = p.from_hf(w, cfg)
        assert ours.shape == p.shape(cfg)
        np.testing.assert_array_equal(p.to_hf(ours, cfg), w)
    # q: HF [N*H, D] rows are output features: our [D, N, H] is its transpose with the heads split out
    q = spec.get("layers/attn/q")
    w = rng.standard_normal(q.hf_shape(cfg)).astype(np.float32)
    np.testing.assert_array_equal(q.from_hf(w, cfg)[:, 1, :], w[12:24].T)
    # counts: written out by hand for this config
    d, f, n, k, h, v, layers = 32, 40, 4, 2, 12, 96, 2
    per_layer = d * n * h * 2 + d * k * h * 2 + 3 * d * f + 2 * d
    assert flops.num_params(cfg) == layers * per_layer + d + 2 * v * d
    assert flops.matmul_params(cfg) == layers * (per_layer - 2 * d) + d * v
    assert math.prod(spec.get("layers/attn/o").full_shape(cfg)) == layers * n * h * d
