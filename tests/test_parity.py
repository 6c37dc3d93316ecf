"""Converted weights give transformers' logits: every Llama variant, HF (single file and sharded) and Meta
sources, direct loading with and without a mesh, and the export round trip back through transformers."""

import json
import os

import jax
import numpy as np
import pytest

from hf_util import hf_logits, make_hf_model
from llama_jax import Llama, LlamaConfig, load
from llama_jax.model.spec import hf_to_meta_rotary
from llama_jax.io.convert import convert_to_llama_jax, export_to_hf
from llama_jax.parallel.sharding import make_mesh, use_mesh

TOL = 1e-4


def _llama3_scaling(factor):
    # original_max_position_embeddings=16 so the test's 40 positions run past it.
    return dict(rope_type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=16)


VARIANTS = {
    "llama2": (dict(num_kv_heads=4, rope_theta=1e4), None),
    "codellama": (dict(num_kv_heads=4, rope_theta=1e6), "6KB"),
    "llama3": (dict(num_kv_heads=2, rope_theta=5e5), None),
    "llama3.1": (dict(num_kv_heads=2, rope_theta=5e5, rope_scaling=_llama3_scaling(8.0)), "20KB"),
    "llama3.2-tied": (dict(num_kv_heads=2, rope_theta=5e5, tie_word_embeddings=True,
                           rope_scaling=_llama3_scaling(32.0)), None),
    "one-kv-head": (dict(num_kv_heads=1, rope_theta=5e5), "20KB"),
    "head-dim-32": (dict(num_kv_heads=2, head_dim=32), None),
}


def our_logits(config, params, tokens):
    return np.asarray(jax.jit(lambda p, t: Llama(config).apply({"params": p}, t))(params, tokens))


def tokens_for(config, length=40, seed=0):
    return np.random.RandomState(seed).randint(0, config.vocab_size, (2, length))


def save_hf(tmp_path, name, overrides, shard_size, seed=0):
    config = LlamaConfig.from_preset("tiny", **overrides)
    model = make_hf_model(config, seed=seed)
    src = tmp_path / name
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(src, **kwargs)
    return config, model, src


@pytest.mark.parametrize("name", list(VARIANTS))
def test_convert_and_load_match_transformers(tmp_path, name):
    overrides, shard_size = VARIANTS[name]
    config, model, src = save_hf(tmp_path, name, overrides, shard_size)
    assert (src / "model.safetensors.index.json").exists() == bool(shard_size)
    tokens = tokens_for(config)
    expected = hf_logits(model, tokens)

    convert_to_llama_jax(src, tmp_path / "converted", progress=False)
    loaded_config, params = load(tmp_path / "converted")
    assert loaded_config.replace(name="") == config.replace(name="")
    np.testing.assert_allclose(our_logits(loaded_config, params, tokens), expected, atol=TOL, rtol=0)

    direct_config, direct = load(src)  # straight from the HF directory, no conversion
    np.testing.assert_allclose(our_logits(direct_config, direct, tokens), expected, atol=TOL, rtol=0)


def test_tied_checkpoint_that_also_stores_lm_head(tmp_path):
    """Some tied HF checkpoints carry lm_head.weight as well; it is accepted and ignored."""
    from llama_jax.io.safetensors_io import SafetensorsFile, write_arrays

    config, model, src = save_hf(tmp_path, "tied", VARIANTS["llama3.2-tied"][0], None)
    f = SafetensorsFile(str(src / "model.safetensors"))
    arrays = [(n, f.read(n)) for n in f.tensors]
    arrays.append(("lm_head.weight", f.read("model.embed_tokens.weight")))
    write_arrays(str(src / "model.safetensors"), arrays)
    cfg, params = load(src)
    assert "lm_head" not in params
    tokens = tokens_for(config, 12)
    np.testing.assert_allclose(our_logits(cfg, params, tokens), hf_logits(model, tokens), atol=TOL, rtol=0)


def test_old_style_config_json(tmp_path):
    """A Llama 1 era config.json: no head_dim, no num_key_value_heads, no rope_theta, max_sequence_length, and
    rope_scaling spelled with "type"."""
    config, model, src = save_hf(tmp_path, "old", dict(num_kv_heads=4, rope_scaling=dict(rope_type="linear",
                                                                                         factor=2.0)), None)
    old = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "rms_norm_eps": 1e-5,
           "max_sequence_length": 256, "vocab_size": 256, "bos_token_id": 1, "eos_token_id": 2,
           "rope_scaling": {"type": "linear", "factor": 2.0}, "torch_dtype": "float32"}
    (src / "config.json").write_text(json.dumps(old))
    convert_to_llama_jax(src, tmp_path / "out", progress=False)
    cfg, params = load(tmp_path / "out")
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.max_position_embeddings) == (4, 16, 256)
    tokens = tokens_for(config, 24)
    np.testing.assert_allclose(our_logits(cfg, params, tokens), hf_logits(model, tokens), atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", ["checkpoint", "hf"])
def test_sharded_load_onto_a_mesh(tmp_path, kind):
    config, model, src = save_hf(tmp_path, "gqa", VARIANTS["llama3.1"][0], "20KB")
    path = src
    if kind == "checkpoint":
        path = convert_to_llama_jax(src, tmp_path / "ckpt", dtype="float32", progress=False)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    cfg, params = load(path, mesh=mesh)
    q = params["layers"]["attn"]["q"]  # [L, D, N, H] split over fsdp (D) and tensor (N)
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 32, 2, 16)
    tokens = tokens_for(config, 24)
    with use_mesh(mesh):
        logits = np.asarray(jax.jit(lambda p, t: Llama(cfg).apply({"params": p}, t))(params, tokens))
    np.testing.assert_allclose(logits, hf_logits(model, tokens), atol=TOL, rtol=0)


def test_bfloat16_conversion_and_load_dtype(tmp_path):
    config, model, src = save_hf(tmp_path, "bf16", VARIANTS["llama3"][0], None)
    out = convert_to_llama_jax(src, tmp_path / "bf16_ckpt", dtype="bfloat16", progress=False)
    cfg, params = load(out)
    assert cfg.param_dtype == "bfloat16" and params["layers"]["mlp"]["up"].dtype == jax.numpy.bfloat16
    cfg32, params32 = load(out, dtype="float32")
    assert cfg32.param_dtype == "float32" and params32["layers"]["mlp"]["up"].dtype == np.float32
    tokens = tokens_for(config, 16)
    # bfloat16 weights: the same model up to rounding of the weights
    np.testing.assert_allclose(our_logits(cfg32, params32, tokens), hf_logits(model, tokens), atol=0.05, rtol=0)


def _write_meta_checkpoint(hf_model, config, directory, params_json, shards=2):
    """Meta's consolidated.NN.pth layout from a HF model: interleaved rotary rows in wq/wk, tensors split
    across `shards` model-parallel files along the axes Meta's model-parallel layers cut them."""
    import torch

    # Meta's names and model-parallel split axes, written out here (not read from llama_jax's spec) so that a
    # wrong spec entry fails this test: (Meta name, axis of the [out, in] matrix Meta's shards cut; None: copied)
    top_level = {"model.embed_tokens.weight": ("tok_embeddings.weight", 1), "model.norm.weight": ("norm.weight", None),
                 "lm_head.weight": ("output.weight", 0)}
    layer_names = {"self_attn.q_proj.weight": ("attention.wq.weight", 0),
                   "self_attn.k_proj.weight": ("attention.wk.weight", 0),
                   "self_attn.v_proj.weight": ("attention.wv.weight", 0),
                   "self_attn.o_proj.weight": ("attention.wo.weight", 1),
                   "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
                   "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
                   "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
                   "input_layernorm.weight": ("attention_norm.weight", None),
                   "post_attention_layernorm.weight": ("ffn_norm.weight", None)}
    parts = [dict() for _ in range(shards)]
    for hf_name, w in hf_model.state_dict().items():
        if hf_name.startswith("model.layers."):
            _, _, i, rest = hf_name.split(".", 3)
            meta_suffix, axis = layer_names[rest]
            meta_name = f"layers.{i}.{meta_suffix}"
        else:
            meta_name, axis = top_level[hf_name]
        if meta_name.endswith("attention.wq.weight"):
            w = torch.from_numpy(hf_to_meta_rotary(w.numpy(), config.num_heads).copy())
        elif meta_name.endswith("attention.wk.weight"):
            w = torch.from_numpy(hf_to_meta_rotary(w.numpy(), config.num_kv_heads).copy())
        pieces = [w] * shards if axis is None else torch.chunk(w, shards, dim=axis)
        for part, piece in zip(parts, pieces):
            part[meta_name] = piece.detach().clone()
    os.makedirs(directory)
    for k, part in enumerate(parts):
        part["rope.freqs"] = torch.zeros(config.head_dim // 2)  # present in Meta's files, unused
        torch.save(part, os.path.join(directory, f"consolidated.{k:02d}.pth"))
    with open(os.path.join(directory, "params.json"), "w") as f:
        json.dump(params_json, f)
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(b"not a real tokenizer; copied as is")


def test_meta_checkpoint_with_two_model_parallel_shards(tmp_path):
    # params.json of a Llama-3-like model; Meta's FFN rule gives 2/3*4*64 = 170 -> multiple of 32 -> 192.
    config = LlamaConfig.from_preset("tiny", num_kv_heads=2, rope_theta=5e5, intermediate_size=192)
    model = make_hf_model(config, seed=3)
    params_json = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": -1, "multiple_of": 32,
                   "norm_eps": 1e-5, "rope_theta": 5e5}
    meta_dir = tmp_path / "meta"
    _write_meta_checkpoint(model, config, str(meta_dir), params_json)
    tokens = tokens_for(config, 24)
    expected = hf_logits(model, tokens)

    out = convert_to_llama_jax(meta_dir, tmp_path / "from_meta", progress=False)
    cfg, params = load(out)
    assert (cfg.vocab_size, cfg.intermediate_size, cfg.num_kv_heads) == (256, 192, 2)
    assert (tmp_path / "from_meta" / "tokenizer.model").exists()
    np.testing.assert_allclose(our_logits(cfg, params, tokens), expected, atol=TOL, rtol=0)
    cfg_direct, direct = load(meta_dir)
    np.testing.assert_allclose(our_logits(cfg_direct, direct, tokens), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["llama3", "llama3.2-tied"])
def test_export_round_trip_through_transformers(tmp_path, name):
    import transformers

    config, model, src = save_hf(tmp_path, name, VARIANTS[name][0], None)
    (src / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    ckpt = convert_to_llama_jax(src, tmp_path / "ckpt", progress=False)
    out = export_to_hf(ckpt, tmp_path / "exported", max_shard_size="30KB", progress=False)
    index = json.loads((tmp_path / "exported" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert (tmp_path / "exported" / "tokenizer_config.json").exists()
    assert ("lm_head.weight" in index["weight_map"]) != config.tie_word_embeddings
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    tokens = tokens_for(config, 24)
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(model, tokens))
