"""The LlamaConfig of a GGUF file from its `llama.*` metadata, and back (the keys llama.cpp reads for the
`llama` architecture).

Llama 3.1-style rope scaling is not in the metadata: llama.cpp's converter stores it as the tensor
`rope_freqs.weight` (one factor per rotary frequency, `LlamaModel.generate_extra_tensors`). `llama3_factors`
computes that tensor from a config; on import the four rope-scaling numbers are recovered from it (factor =
its largest value; the two wavelength bounds from the smooth ramp between them) and checked by recomputing it.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Set

import numpy as np

from llama_jax.config import LlamaConfig, RopeScaling
from llama_jax.errors import ConfigError, ConversionError

ARCH = "llama"


def _get(meta: Dict[str, object], key: str, path: str, kind=int, default=None):
    value = meta.get(key, default)
    if value is None:
        raise ConversionError(f"{path}: metadata key {key!r} is missing (a llama GGUF has it)")
    if isinstance(value, (list, np.ndarray)) and kind is int:  # per-layer head counts: all equal for Llama
        values = set(np.asarray(value).tolist())
        if len(values) != 1:
            raise ConversionError(f"{path}: metadata {key}={sorted(values)[:4]}: per-layer values differ; a "
                                  "Llama has the same value in every layer")
        value = values.pop()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConversionError(f"{path}: metadata {key}={value!r:.60}: expected a number")
    if kind is float and float(np.float32(value)) == value:
        return float(str(np.float32(value)))  # stored as float32: 1e-5 comes back as 1e-05, not 9.99999975e-06
    return kind(value)


def config_from_metadata(meta: Dict[str, object], path: str, tensor_names: Set[str],
                         rope_freqs: Optional[np.ndarray] = None) -> LlamaConfig:
    """LlamaConfig from GGUF metadata; ConversionError (one line, naming the key) otherwise."""
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise ConversionError(f"{path}: general.architecture={arch!r}: only Llama GGUF files are read "
                              f"(expected {ARCH!r})")
    k = lambda key, kind=int, default=None: _get(meta, f"{ARCH}.{key}", path, kind, default)  # noqa: E731
    heads = k("attention.head_count")
    hidden = k("embedding_length")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = k("vocab_size", int, len(tokens) if tokens else None)
    eos = [meta[key] for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                 "tokenizer.ggml.eom_token_id") if isinstance(meta.get(key), int)]
    kwargs = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=k("feed_forward_length"),
        num_layers=k("block_count"), num_heads=heads, num_kv_heads=k("attention.head_count_kv", int, heads),
        head_dim=k("attention.key_length", int, hidden // heads if heads else None),
        rms_norm_eps=k("attention.layer_norm_rms_epsilon", float, 1e-5),
        rope_theta=k("rope.freq_base", float, 10000.0),
        max_position_embeddings=k("context_length", int, 4096),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=tuple(dict.fromkeys(eos)),
        name=str(meta.get("general.name") or ""),
    )
    try:
        config = LlamaConfig(**kwargs)
        scaling = _rope_scaling(meta, path, config, rope_freqs)
        return config.replace(rope_scaling=scaling) if scaling else config
    except ConfigError as e:
        raise ConversionError(f"{path}: {e}") from None


def _rope_scaling(meta, path, config: LlamaConfig, rope_freqs) -> Optional[RopeScaling]:
    kind = meta.get(f"{ARCH}.rope.scaling.type")
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=_get(meta, f"{ARCH}.rope.scaling.factor", path, float))
    if kind not in (None, "none"):
        raise ConversionError(f"{path}: metadata {ARCH}.rope.scaling.type={kind!r}: llama_jax reads 'linear' or "
                              "Llama 3 scaling (the rope_freqs.weight tensor)")
    if rope_freqs is None:
        return None
    original = _get(meta, f"{ARCH}.rope.scaling.original_context_length", path, int, 8192)
    return llama3_from_factors(np.asarray(rope_freqs, np.float64).reshape(-1), config, original, path)


def _inv_freqs(config: LlamaConfig) -> np.ndarray:
    dim = config.head_dim
    return 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


def llama3_factors(config: LlamaConfig, scaling: Optional[RopeScaling] = None) -> np.ndarray:
    """llama.cpp's rope_freqs.weight for Llama 3 scaling: the divisor of each rotary frequency (float32)."""
    s = scaling or config.rope_scaling
    wavelen = 2 * math.pi / _inv_freqs(config)
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor -
                                                                                   s.low_freq_factor)
    ramp = 1 / ((1 - smooth) / s.factor + smooth)
    return np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, s.factor, ramp)).astype(np.float32)


def llama3_from_factors(factors: np.ndarray, config: LlamaConfig, original: int, path: str) -> RopeScaling:
    """The RopeScaling whose llama3_factors equal `factors` (Llama 3.x values first; else solved from the ramp)."""
    if factors.shape != (config.head_dim // 2,):
        raise ConversionError(f"{path}: tensor rope_freqs.weight has {factors.size} values, expected "
                              f"head_dim / 2 = {config.head_dim // 2}")
    factor = float(factors.max())
    candidates = [RopeScaling(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=original)]
    # On the ramp 1/f = (1 - s)/factor + s, s = original/wavelen * a + b is linear in 1/wavelen: two points give
    # a = 1/(high - low) and b = -low/(high - low).
    inv_wavelen = _inv_freqs(config) / (2 * math.pi)
    ramp = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
    if ramp.sum() >= 2 and factor > 1:
        s = (1 / factors[ramp] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(original * inv_wavelen[ramp], s, 1)
        if slope > 0:
            high_minus_low = 1 / slope
            low = -intercept * high_minus_low
            try:
                candidates.append(RopeScaling(factor=factor, low_freq_factor=float(low),
                                              high_freq_factor=float(low + high_minus_low),
                                              original_max_position_embeddings=original))
            except ConfigError:
                pass
    for scaling in candidates:
        if np.allclose(llama3_factors(config, scaling), factors, rtol=1e-4, atol=1e-6):
            return scaling
    raise ConversionError(f"{path}: tensor rope_freqs.weight is not Llama 3 rope scaling with "
                          f"original_context_length={original}; llama_jax cannot reproduce it")


def metadata_of(config: LlamaConfig, file_type: int) -> Dict[str, tuple]:
    """{key: (value, kind)} llama.cpp reads for a `llama` model; kind names a GGUFWriter add_* method."""
    out = {
        "general.name": (config.name or "llama_jax", "string"),
        "general.file_type": (file_type, "uint32"),
        "general.quantization_version": (2, "uint32"),
        f"{ARCH}.vocab_size": (config.vocab_size, "uint32"),
        f"{ARCH}.context_length": (config.max_position_embeddings, "uint32"),
        f"{ARCH}.embedding_length": (config.hidden_size, "uint32"),
        f"{ARCH}.block_count": (config.num_layers, "uint32"),
        f"{ARCH}.feed_forward_length": (config.intermediate_size, "uint32"),
        f"{ARCH}.attention.head_count": (config.num_heads, "uint32"),
        f"{ARCH}.attention.head_count_kv": (config.num_kv_heads, "uint32"),
        f"{ARCH}.attention.layer_norm_rms_epsilon": (config.rms_norm_eps, "float32"),
        f"{ARCH}.rope.freq_base": (config.rope_theta, "float32"),
        f"{ARCH}.rope.dimension_count": (config.head_dim, "uint32"),
    }
    if config.head_dim * config.num_heads != config.hidden_size:
        out[f"{ARCH}.attention.key_length"] = (config.head_dim, "uint32")
        out[f"{ARCH}.attention.value_length"] = (config.head_dim, "uint32")
    s = config.rope_scaling
    if s is not None and s.rope_type == "linear":
        out[f"{ARCH}.rope.scaling.type"] = ("linear", "string")
        out[f"{ARCH}.rope.scaling.factor"] = (s.factor, "float32")
    elif s is not None and s.original_max_position_embeddings != 8192:
        out[f"{ARCH}.rope.scaling.original_context_length"] = (s.original_max_position_embeddings, "uint32")
    return out
