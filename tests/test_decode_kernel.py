"""The Pallas paged decode-attention kernel (model/decode_kernel.py), in interpret mode on the CPU, against the
XLA decode path: ragged lengths, GQA, several steps, a mesh, and the sampler's greedy tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.config import LlamaConfig
from llama_jax.model import decode_kernel
from llama_jax.model.attention import dot_product_attention
from llama_jax.model.transformer import init_cache, init_params
from llama_jax.parallel.sharding import make_mesh, param_shardings, use_mesh
from llama_jax.sampling import program

# 4 query heads over 2 kv heads (GQA), head dim 16
CFG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=128, bos_token_id=1, eos_token_id=2, decode_attention="paged")
PROMPTS = [[1, 5, 9], [1] + list(range(20, 31))]  # lengths 3 and 12: ragged


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(0))


def _bf16_exact(x):
    """float32 values that bf16 holds exactly: the kernel reads keys and values as bf16."""
    return x.astype(jnp.bfloat16).astype(jnp.float32)


def test_kernel_equals_xla_attention_ragged_gqa():
    kv, depth, batch, slots, h, n = 2, 3, 3, 24, 16, 8  # 4 query heads per kv head; 3 pages of 8 per row
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    pool = {name: _bf16_exact(jax.random.normal(key, (kv, depth, batch, slots, h)))
            for name, key in zip("kv", keys[:2])}
    q = jax.random.normal(keys[2], (batch, n, h))
    lengths = jnp.array([3, 17, 24], jnp.int32)  # inside a page, across pages, the whole row
    layer = 1
    out = decode_kernel.paged_decode(q, pool, jnp.int32(layer), lengths)  # [B, N, H]
    k = pool["k"][:, layer].transpose(1, 0, 3, 2)  # [B, K, H, S]: the XLA cache layouts
    v = pool["v"][:, layer].transpose(1, 0, 2, 3)  # [B, K, S, H]
    mask = (jnp.arange(slots)[None, :] < lengths[:, None])[:, None, :]  # [B, 1, S]
    want = dot_product_attention(q[:, None], k, v, mask)[:, 0]
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)


def _decode_logits(config, params, paged: bool, steps: int):
    """Prefill PROMPTS, then `steps` greedy decode steps through program.prefill/decode_step, bf16 caches
    (fp32 compute) -> logits [steps + 1, B, V]."""
    tokens, lengths, _ = program._pad_batch(PROMPTS)
    tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
    batch, plen = tokens.shape
    cache_len = program.bucket(plen + steps)
    cfg = config.replace(decode_attention="paged" if paged else "xla")
    init = decode_kernel.init_paged_cache if paged else init_cache
    cache = init(cfg, batch, cache_len, dtype=jnp.bfloat16)
    mask = program.kv_mask(lengths, plen, cache_len)
    logits, cache = program.prefill(cfg, params, tokens, lengths, cache, mask)
    out = [logits[:, 0]]
    step_fn = jax.jit(lambda p, t, c, s: program.decode_step(cfg, p, t, lengths, c, s, mask, plen=plen))
    for step in range(1, steps + 1):
        logits, cache = step_fn(params, jnp.argmax(out[-1], -1).astype(jnp.int32), cache, jnp.int32(step))
        out.append(logits[:, 0])
    return np.stack([np.asarray(x) for x in out])


@pytest.mark.slow
def test_decode_steps_equal_xla_on_a_mesh(params):
    """Prefill and 3 decode steps give the XLA path's logits (both caches bf16), with the kernel run per shard
    under shard_map: kv heads over 2 devices, rows over 2."""
    mesh = make_mesh(data=2, tensor=2, devices=jax.devices()[:4])
    sharded = jax.device_put(params, param_shardings(CFG, mesh))
    with use_mesh(mesh):
        paged = _decode_logits(CFG, sharded, True, 3)
    np.testing.assert_allclose(paged, _decode_logits(CFG, params, False, 3), rtol=2e-5, atol=2e-5)


def test_greedy_tokens_equal_xla(params):
    """generate_ids with decode_attention="paged" (interpret mode here) gives the XLA path's greedy tokens."""
    paged = program.generate_ids(params, CFG, PROMPTS, max_new_tokens=5)
    xla = program.generate_ids(params, CFG.replace(decode_attention="xla"), PROMPTS, max_new_tokens=5)
    assert paged == xla and all(len(row) == 5 for row in paged)


def test_auto_is_xla_off_a_tpu(params):
    assert program.resolve_decode_attention(CFG.replace(decode_attention="auto"), params).decode_attention == "xla"


def test_aot_decode_step_compiles_the_kernel_for_a_tpu_slice(tmp_path):
    """`aot sample` for a v5e slice: "auto" picks the paged kernel (bf16, head dim 128) and compiles it per shard
    (rows over fsdp); the decode step updates the donated pool in place, no copy of it (8 kv heads per chip led
    XLA to copy it once)."""
    pytest.importorskip("libtpu", reason="needs the TPU compiler wheel (requirements-test.txt: libtpu)")
    from llama_jax import aot

    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8,
                      num_kv_heads=8, head_dim=128, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)
    (tmp_path / "config.json").write_text(__import__("json").dumps(cfg.to_hf_dict()))
    r = aot.compile_sample(str(tmp_path), "v5e:2x2", batch=4, context=8192, prompt=128, tensor=1, attention="xla")
    assert r.decode_attention == "paged" and r.fits and r.mesh_shape == {"data": 1, "fsdp": 4, "tensor": 1}
    cache = r.decode.inputs["kv_cache"]
    assert cache == 2 * 2 * 4 * 8192 * 8 * 128 * 2 // 4  # k and v, L, B, S, K, H, bf16: rows over 4 chips
    assert r.decode.alias >= cache and r.decode.temp < cache // 8  # a copy of the pools was 2x cache
