"""Splash attention (the Pallas TPU kernel, here in Pallas interpret mode on CPU) equals our XLA attention:
forward and gradients, with packed-document segment ids, with GQA and MQA; the whole model's logits and
gradients with attention=splash equal attention=xla; the sampler's prefill (left padding) too; and on a
4-device mesh (tensor=2) the kernel runs per shard under shard_map and still agrees."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import Llama, LlamaConfig, init_params
from llama_jax.model import splash
from llama_jax.model.attention import causal_mask, dot_product_attention
from llama_jax.parallel.attention import kv_repeats
from llama_jax.parallel.sharding import make_mesh, make_rules, param_shardings, use_mesh

T = 128  # the kernel's smallest tile (TPU lanes)
CFG = LlamaConfig.from_preset("tiny", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                              num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256)


def _close(actual, expected, what, tol=2e-5):
    actual, expected = np.asarray(actual), np.asarray(expected)
    err = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30)
    assert err <= tol, f"{what}: relative error {err:.1e} > {tol:.0e}"


def _segments(batch, length):
    """Two packed documents per row, the second starting at a row-dependent place."""
    starts = np.array([37 + 20 * b for b in range(batch)])[:, None]
    return jnp.asarray((np.arange(length)[None] >= starts).astype(np.int32))


def _qkv(batch, heads, kv_heads, head_dim=16, seed=0, length=T):
    """q [B, T, N, H], k [B, K, H, S], v [B, K, S, H] (the model's layouts), float32."""
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(kq, (batch, length, heads, head_dim)),
            jax.random.normal(kk, (batch, kv_heads, head_dim, length)),
            jax.random.normal(kv, (batch, kv_heads, length, head_dim)))


def _weighted_sum(fn):
    """A scalar of the attention output whose gradient reaches every element differently."""
    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape)))
    return loss


# GQA with packed documents is also the whole-model test's case (CFG: 4 heads, 2 kv heads).
@pytest.mark.parametrize("kv_heads,packed", [(1, True), pytest.param(4, False, marks=pytest.mark.slow)],
                         ids=["mqa-packed", "mha"])
def test_kernel_equals_xla_forward_and_gradients(kv_heads, packed):
    q, k, v = _qkv(2, 4, kv_heads)
    seg = _segments(2, T) if packed else jnp.zeros((2, T), jnp.int32)
    mask = causal_mask(seg if packed else None, 2, T)
    xla = lambda q, k, v: dot_product_attention(q, k, v, mask, causal_from_zero=True)  # noqa: E731
    kernel = lambda q, k, v: splash.splash_attention(q, k, v, seg)  # noqa: E731
    _close(jax.jit(kernel)(q, k, v), xla(q, k, v), "forward")
    got = jax.jit(jax.grad(_weighted_sum(kernel), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(_weighted_sum(xla), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        _close(g, w, f"d{name}")


def test_runs_splash_choice():
    assert not splash.runs_splash(CFG, T, True)  # auto on a CPU: XLA
    forced = CFG.replace(attention="splash")
    assert splash.runs_splash(forced, T, True)
    assert not splash.runs_splash(forced, 96, True)  # not a multiple of the 128 lanes: XLA
    assert not splash.runs_splash(forced, T, False)  # a decode step into a filled cache: XLA
    assert kv_repeats(8, 2, 4) == 2 and kv_repeats(8, 8, 4) == 1 and kv_repeats(8, 1, 2) == 2


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(1))


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.PRNGKey(2), (2, T), 0, CFG.vocab_size)


def _loss(config, segment_ids):
    def loss(params, tokens):
        logits = Llama(config).apply({"params": params}, tokens, segment_ids=segment_ids)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits
    return loss


def test_model_logits_and_gradients(params, tokens):
    seg = _segments(2, T)
    (_, want), want_grads = jax.value_and_grad(_loss(CFG.replace(attention="xla"), seg), has_aux=True)(params, tokens)
    run = jax.jit(jax.value_and_grad(_loss(CFG.replace(attention="splash"), seg), has_aux=True))
    (_, got), got_grads = run(params, tokens)
    _close(got, want, "logits")
    jax.tree_util.tree_map_with_path(lambda p, g, w: _close(g, w, f"d/{jax.tree_util.keystr(p)}", 1e-4),
                                     got_grads, want_grads)
    # The kernel really ran: its pallas_call is in the program.
    assert "pallas_call" in str(jax.make_jaxpr(_loss(CFG.replace(attention="splash"), seg))(params, tokens))


def test_sampler_prefill_with_left_padding(params):
    from llama_jax.sampling import program

    lengths = jnp.asarray([T, 90], jnp.int32)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, T), 0, CFG.vocab_size)
    cache_len = 2 * T
    mask = program.kv_mask(lengths, T, cache_len)

    def prefill(config):
        cache = jax.tree.map(jnp.zeros_like, program.init_cache(config, 2, cache_len))
        return jax.jit(program.prefill, static_argnums=0)(config, params, tokens, lengths, cache, mask)

    (want, want_cache), (got, got_cache) = prefill(CFG.replace(attention="xla")), prefill(CFG.replace(attention="splash"))
    _close(got, want, "last-token logits")
    # Only the prompt's slots: padding slots hold values nothing reads (XLA and splash fill them differently).
    valid = np.asarray(mask)[None, :, None, None, :]
    _close(np.where(valid, got_cache["k"], 0), np.where(valid, want_cache["k"], 0), "cached keys")


def test_sharded_on_a_4_device_mesh(params, tokens):
    mesh = make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])
    seg = _segments(2, T)
    config = CFG.replace(attention="splash")
    sharded = jax.device_put(params, param_shardings(config, mesh))
    with use_mesh(mesh):
        run = jax.jit(jax.value_and_grad(_loss(config, seg), has_aux=True))
        (_, got), got_grads = run(sharded, tokens)
        jaxpr = str(jax.make_jaxpr(_loss(config, seg))(sharded, tokens))
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr
    (_, want), want_grads = jax.value_and_grad(_loss(CFG.replace(attention="xla"), seg), has_aux=True)(params, tokens)
    _close(got, want, "logits on data=2 x tensor=2")
    jax.tree.map(lambda g, w: _close(g, w, "gradient on data=2 x tensor=2", 1e-4), got_grads, want_grads)


@pytest.mark.slow
def test_query_sequence_split_and_kv_heads_repeated():
    """Queries split along the sequence over fsdp=2 (rules: length -> fsdp), and 8 query heads with 2 kv heads on
    tensor=4: each device's two query heads need their group's kv head, so the kv heads are repeated."""
    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    rules = make_rules({"batch": None, "length": "fsdp"})
    q, k, v = _qkv(2, 8, 2, seed=4, length=2 * T)
    seg = _segments(2, 2 * T)
    want = dot_product_attention(q, k, v, causal_mask(seg, 2, 2 * T), causal_from_zero=True)
    with use_mesh(mesh, rules):
        got = jax.jit(splash.splash_attention)(q, k, v, seg)
        assert "shard_map" in str(jax.make_jaxpr(splash.splash_attention)(q, k, v, seg))
    _close(got, want, "forward, queries over fsdp=2, heads over tensor=4 with 2 kv heads")


def test_run_config_and_checkpoint_metadata():
    from llama_jax.io.checkpoint import config_from_dict, config_to_dict
    from llama_jax.training.run_config import RunConfig, apply_overrides
    from llama_jax.training.setup import model_config

    cfg = apply_overrides(RunConfig(), ["model.attention=splash", "model.preset=tiny"])
    assert model_config(cfg).attention == "splash"
    assert RunConfig().model.attention == "auto"
    # llama_jax.json stays as before: how attention runs is the reading machine's choice.
    stored = config_to_dict(CFG.replace(attention="splash"))
    assert "attention" not in stored and config_from_dict(stored) == CFG
    assert dataclasses.replace(CFG, attention="xla") != CFG  # a static jit argument: each setting compiles apart
