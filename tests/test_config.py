"""Presets carry the values of each released config.json; from_meta / from_hf read real files, old and new."""

import json

import pytest

from llama_jax import ConfigError, LlamaConfig, RopeScaling

# Key values of each released Hugging Face config.json, written out independently of presets.py:
# (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, vocab_size,
#  rope_theta, max_position_embeddings, rms_norm_eps)
RELEASED = {
    "llama1-7b": (4096, 11008, 32, 32, 32, 32000, 1e4, 2048, 1e-6),
    "llama1-13b": (5120, 13824, 40, 40, 40, 32000, 1e4, 2048, 1e-6),
    "llama1-33b": (6656, 17920, 60, 52, 52, 32000, 1e4, 2048, 1e-6),
    "llama1-65b": (8192, 22016, 80, 64, 64, 32000, 1e4, 2048, 1e-5),
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000, 1e4, 4096, 1e-5),
    "llama2-13b": (5120, 13824, 40, 40, 40, 32000, 1e4, 4096, 1e-5),
    "llama2-70b": (8192, 28672, 80, 64, 8, 32000, 1e4, 4096, 1e-5),
    "codellama-7b": (4096, 11008, 32, 32, 32, 32016, 1e6, 16384, 1e-5),
    "codellama-13b": (5120, 13824, 40, 40, 40, 32016, 1e6, 16384, 1e-5),
    "codellama-34b": (8192, 22016, 48, 64, 8, 32000, 1e6, 16384, 1e-5),
    "codellama-70b": (8192, 28672, 80, 64, 8, 32016, 1e6, 16384, 1e-5),
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256, 5e5, 8192, 1e-5),
    "llama3-70b": (8192, 28672, 80, 64, 8, 128256, 5e5, 8192, 1e-5),
    "llama3.1-8b": (4096, 14336, 32, 32, 8, 128256, 5e5, 131072, 1e-5),
    "llama3.1-70b": (8192, 28672, 80, 64, 8, 128256, 5e5, 131072, 1e-5),
    "llama3.1-405b": (16384, 53248, 126, 128, 8, 128256, 5e5, 131072, 1e-5),
    "llama3.2-1b": (2048, 8192, 16, 32, 8, 128256, 5e5, 131072, 1e-5),
    "llama3.2-3b": (3072, 8192, 28, 24, 8, 128256, 5e5, 131072, 1e-5),
    "llama3.3-70b": (8192, 28672, 80, 64, 8, 128256, 5e5, 131072, 1e-5),
}
# rope_scaling factor (None: no scaling), tie_word_embeddings, head_dim
SCALING = {"llama3.1-8b": 8.0, "llama3.1-70b": 8.0, "llama3.1-405b": 8.0, "llama3.2-1b": 32.0,
           "llama3.2-3b": 32.0, "llama3.3-70b": 8.0}
TIED = {"llama3.2-1b", "llama3.2-3b"}
HEAD_DIM = {"llama3.2-1b": 64, "llama3.2-3b": 128, "llama3.1-405b": 128, "llama1-33b": 128}


@pytest.mark.parametrize("name", list(RELEASED))
def test_preset_matches_released_config(name):
    c = LlamaConfig.from_preset(name)
    d, f, layers, heads, kv, vocab, theta, max_len, eps = RELEASED[name]
    assert (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads) == (d, f, layers, heads, kv)
    assert (c.vocab_size, c.rope_theta, c.max_position_embeddings, c.rms_norm_eps) == (vocab, theta, max_len, eps)
    assert c.tie_word_embeddings == (name in TIED)
    assert c.head_dim == HEAD_DIM.get(name, d // heads)
    if name in SCALING:
        assert c.rope_scaling == RopeScaling("llama3", SCALING[name], 1.0, 4.0, 8192)
    else:
        assert c.rope_scaling is None
    assert c.bos_token_id == (128000 if vocab == 128256 else 1)
    if name == "llama3.3-70b":
        assert c.eos_token_id == (128001, 128008, 128009)


def test_to_hf_dict_round_trips_through_from_hf():
    for name in ("llama2-70b", "llama3.2-1b", "llama3.3-70b", "codellama-34b"):
        c = LlamaConfig.from_preset(name)
        d = c.to_hf_dict()
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "vocab_size",
                    "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
            assert key in d
        assert LlamaConfig.from_hf(json.loads(json.dumps(d))) == c.replace(name="")


# ------------------------------------------------------------------------- Meta params.json, as released
LLAMA2_7B_PARAMS = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
                    "vocab_size": -1}
LLAMA2_70B_PARAMS = {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
                     "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}
LLAMA3_8B_PARAMS = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                    "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0}
LLAMA31_8B_PARAMS = dict(LLAMA3_8B_PARAMS, use_scaled_rope=True)
LLAMA32_1B_PARAMS = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                     "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0,
                     "use_scaled_rope": True}


def test_from_meta_llama2_7b_needs_vocab_from_the_embedding(tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps(LLAMA2_7B_PARAMS))
    with pytest.raises(ConfigError, match="vocab_size=-1"):
        LlamaConfig.from_meta(path)
    c = LlamaConfig.from_meta(tmp_path, vocab_size=32000)
    assert c == LlamaConfig.from_preset("llama2-7b").replace(name="")


def test_from_meta_llama2_70b():
    c = LlamaConfig.from_meta(LLAMA2_70B_PARAMS, vocab_size=32000)
    assert (c.intermediate_size, c.num_kv_heads) == (28672, 8)
    assert c == LlamaConfig.from_preset("llama2-70b").replace(name="")


def test_from_meta_llama3_8b_mlp_width():
    c = LlamaConfig.from_meta(LLAMA3_8B_PARAMS)
    assert c.intermediate_size == 14336  # 1.3 * (2/3 * 4 * 4096), rounded up to a multiple of 1024
    assert (c.vocab_size, c.rope_theta, c.rope_scaling, c.max_position_embeddings) == (128256, 5e5, None, 8192)


def test_from_meta_llama31_8b_scaled_rope():
    c = LlamaConfig.from_meta(LLAMA31_8B_PARAMS)
    assert c.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert (c.intermediate_size, c.max_position_embeddings, c.tie_word_embeddings) == (14336, 131072, False)


def test_from_meta_llama32_1b_factor_32_and_tied():
    c = LlamaConfig.from_meta(LLAMA32_1B_PARAMS)
    assert c.rope_scaling.factor == 32.0
    assert (c.intermediate_size, c.head_dim, c.tie_word_embeddings) == (8192, 64, True)
    preset = LlamaConfig.from_preset("llama3.2-1b")
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads) == (
        preset.hidden_size, preset.num_layers, preset.num_heads, preset.num_kv_heads)


# ------------------------------------------------------------------------- Hugging Face config.json, old styles
HUGGYLLAMA_7B = {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
                 "hidden_size": 4096, "intermediate_size": 11008, "initializer_range": 0.02,
                 "max_sequence_length": 2048, "model_type": "llama", "num_attention_heads": 32,
                 "num_hidden_layers": 32, "pad_token_id": 0, "rms_norm_eps": 1e-06, "tie_word_embeddings": False,
                 "torch_dtype": "float16", "transformers_version": "4.28.0.dev0", "use_cache": True,
                 "vocab_size": 32000}


def test_from_hf_llama1_huggyllama_style():
    c = LlamaConfig.from_hf(HUGGYLLAMA_7B)
    assert c == LlamaConfig.from_preset("llama1-7b").replace(name="")
    assert (c.num_kv_heads, c.head_dim, c.max_position_embeddings, c.rope_theta) == (32, 128, 2048, 1e4)


def test_from_hf_linear_rope_scaling_with_old_type_key(tmp_path):
    d = dict(HUGGYLLAMA_7B, max_position_embeddings=8192, rope_scaling={"type": "linear", "factor": 4.0})
    (tmp_path / "config.json").write_text(json.dumps(d))
    c = LlamaConfig.from_hf(tmp_path)
    assert c.rope_scaling == RopeScaling(rope_type="linear", factor=4.0)
    assert c.max_position_embeddings == 8192


def test_from_hf_transformers5_rope_parameters():
    """transformers >= 5 writes theta and scaling together under rope_parameters."""
    d = LlamaConfig.from_preset("llama3.1-8b").to_hf_dict()
    scaling = d.pop("rope_scaling")
    d["rope_parameters"] = dict(scaling, rope_theta=d.pop("rope_theta"))
    assert LlamaConfig.from_hf(d) == LlamaConfig.from_preset("llama3.1-8b").replace(name="")


def test_from_hf_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(ConfigError, match="config.json: file not found"):
        LlamaConfig.from_hf(tmp_path)
    bad = dict(HUGGYLLAMA_7B)
    del bad["hidden_size"]
    with pytest.raises(ConfigError, match=r"missing required key\(s\) \['hidden_size'\]"):
        LlamaConfig.from_hf(bad)
    with pytest.raises(ConfigError, match="rope_type 'yarn' is not supported"):
        LlamaConfig.from_hf(dict(HUGGYLLAMA_7B, rope_scaling={"rope_type": "yarn", "factor": 2.0}))
