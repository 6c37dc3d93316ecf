"""LlamaConfig: one frozen dataclass for every released Llama, plus readers for the files people have.

`LlamaConfig.from_preset(name)` gives the values of each released `config.json`; `from_hf` reads a Hugging
Face `config.json` (old and new spellings), `from_meta` reads Meta's `params.json`; `to_hf_dict` writes the
standard `config.json` keys back out. The config is hashable so it can be a static argument under `jit`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import operator
import os
from typing import Any, Mapping, Optional, Tuple, Union
from llama_jax.errors import ConfigError  # noqa: F401 (also re-exported)

PathOrDict = Union[str, os.PathLike, Mapping[str, Any]]

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_qkv_proj")
# How attention runs: "splash" is the Pallas TPU kernel (Pallas interpret mode elsewhere: slow, for tests), "xla"
# the blocked XLA attention of model/attention.py, "auto" splash when compiling for a TPU and XLA elsewhere.
ATTENTION_KINDS = ("auto", "xla", "splash")
# How the Sampler's decode steps attend over the KV cache: "paged" is the Pallas TPU paged-attention kernel
# (model/decode_kernel.py; interpret mode elsewhere, for tests), "xla" the XLA attention, "auto" paged when
# compiling for a TPU with a bf16 cache and XLA elsewhere. Apart from `attention`: decode is another kernel.
DECODE_ATTENTION_KINDS = ("auto", "xla", "paged")
DTYPES = ("float32", "bfloat16", "float16")
# Mllama's token embedding holds this many rows past the vocabulary (transformers: vocab_size + 8).
IMAGE_EMBED_ROWS = 8
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `llama3` is Llama 3.1+'s wavelength-dependent scaling; `linear` divides all
    frequencies by `factor` (position interpolation)."""

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("linear", "llama3"):
            raise ConfigError(f"rope_scaling.rope_type={self.rope_type!r}: expected 'linear' or 'llama3'")
        if not self.factor > 0:
            raise ConfigError(f"rope_scaling.factor={self.factor}: expected a positive number")
        if self.rope_type == "llama3":
            if not self.high_freq_factor > self.low_freq_factor > 0:
                raise ConfigError(
                    f"rope_scaling: expected high_freq_factor > low_freq_factor > 0, found "
                    f"high_freq_factor={self.high_freq_factor}, low_freq_factor={self.low_freq_factor}")
            if self.original_max_position_embeddings <= 0:
                raise ConfigError("rope_scaling.original_max_position_embeddings must be positive, found "
                                  f"{self.original_max_position_embeddings}")

    def to_hf_dict(self) -> dict:
        if self.rope_type == "linear":
            return {"rope_type": "linear", "factor": self.factor}
        return {"rope_type": "llama3", "factor": self.factor, "low_freq_factor": self.low_freq_factor,
                "high_freq_factor": self.high_freq_factor,
                "original_max_position_embeddings": self.original_max_position_embeddings}

    @classmethod
    def from_hf_dict(cls, d: Optional[Mapping[str, Any]], where: str = "rope_scaling") -> Optional["RopeScaling"]:
        if d is None:
            return None
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}={d!r:.60}: expected an object")
        # transformers < 4.43 wrote "type"; newer ones write "rope_type" (and sometimes both).
        kind = d.get("rope_type", d.get("type"))
        if kind in (None, "default"):
            return None
        if kind not in ("linear", "llama3"):
            raise ConfigError(f"{where}: rope_type {kind!r} is not supported; expected 'linear' or 'llama3'")
        if "factor" not in d:
            raise ConfigError(f"{where}: rope_type {kind!r} needs a 'factor'")
        if kind == "linear":
            return cls(rope_type="linear", factor=_number(d, "factor", where, float))
        missing = [k for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                   if k not in d]
        if missing:
            raise ConfigError(f"{where}: rope_type 'llama3' needs {', '.join(missing)}")
        return cls(rope_type="llama3", factor=_number(d, "factor", where, float),
                   low_freq_factor=_number(d, "low_freq_factor", where, float),
                   high_freq_factor=_number(d, "high_freq_factor", where, float),
                   original_max_position_embeddings=_number(d, "original_max_position_embeddings", where))


_ASPECT_RATIOS_4 = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Llama 3.2 Vision's image encoder (a ViT over up to `max_num_tiles` tiles of image_size x image_size).

    `num_layers` local layers keep the outputs of `intermediate_layers_indices`; `num_global_layers` gated
    layers follow. The encoder's output per patch is hidden_size x (1 + len(intermediate_layers_indices)) =
    `vision_output_dim`, projected to the text model's width. Values as in the `vision_config` of a Hugging
    Face Mllama `config.json`.
    """

    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_layers: int = 32
    num_global_layers: int = 8
    num_heads: int = 16
    num_channels: int = 3
    image_size: int = 560
    patch_size: int = 14
    max_num_tiles: int = 4
    intermediate_layers_indices: Tuple[int, ...] = (3, 7, 15, 23, 30)
    supported_aspect_ratios: Tuple[Tuple[int, int], ...] = _ASPECT_RATIOS_4
    vision_output_dim: int = 7680
    norm_eps: float = 1e-5

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - JSON lists -> hashable tuples
        set_("intermediate_layers_indices", tuple(_as_int(i) for i in self.intermediate_layers_indices))
        set_("supported_aspect_ratios", tuple(tuple(_as_int(n) for n in r) for r in self.supported_aspect_ratios))
        for key in ("hidden_size", "intermediate_size", "num_layers", "num_global_layers", "num_heads",
                    "num_channels", "image_size", "patch_size", "max_num_tiles", "vision_output_dim"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"VisionConfig.{key}={value!r}: expected a positive integer")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"VisionConfig: hidden_size={self.hidden_size} is not a multiple of "
                              f"num_heads={self.num_heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"VisionConfig: image_size={self.image_size} is not a multiple of "
                              f"patch_size={self.patch_size}")
        bad = [i for i in self.intermediate_layers_indices if not 0 <= i < self.num_layers]
        if bad or len(set(self.intermediate_layers_indices)) != len(self.intermediate_layers_indices):
            raise ConfigError(f"VisionConfig.intermediate_layers_indices={list(self.intermediate_layers_indices)}: "
                              f"expected distinct layer indices in [0, {self.num_layers})")
        expected = self.hidden_size * (1 + len(self.intermediate_layers_indices))
        if self.vision_output_dim != expected:
            raise ConfigError(f"VisionConfig.vision_output_dim={self.vision_output_dim}: expected hidden_size x "
                              f"(1 + len(intermediate_layers_indices)) = {expected}")
        for ratio in self.supported_aspect_ratios:
            if len(ratio) != 2 or min(ratio) <= 0 or ratio[0] * ratio[1] > self.max_num_tiles:
                raise ConfigError(f"VisionConfig.supported_aspect_ratios: {list(ratio)} is not [rows, cols] with "
                                  f"rows x cols <= max_num_tiles={self.max_num_tiles}")
        if not self.norm_eps > 0:
            raise ConfigError(f"VisionConfig.norm_eps={self.norm_eps}: expected a positive number")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Tokens per tile: the patches plus the class token."""
        return self.patches_per_side ** 2 + 1

    @property
    def max_aspect_ratio_id(self) -> int:
        """Aspect-ratio ids run 1..len(supported_aspect_ratios); 0 pads a missing image."""
        return len(self.supported_aspect_ratios)

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], where: str = "vision_config") -> "VisionConfig":
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}={d!r:.60}: expected an object")
        if d.get("hidden_act", "gelu") != "gelu":
            raise ConfigError(f"{where}: hidden_act={d['hidden_act']!r} is not supported (expected 'gelu')")
        num = lambda key, kind=int, default=None: _number(d, key, where, kind, default)  # noqa: E731
        kwargs = dict(hidden_size=num("hidden_size", int, 1280), intermediate_size=num("intermediate_size", int, 5120),
                      num_layers=num("num_hidden_layers", int, 32), num_global_layers=num("num_global_layers", int, 8),
                      num_heads=num("attention_heads", int, None) or num("num_attention_heads", int, 16),
                      num_channels=num("num_channels", int, 3), image_size=_side(d, "image_size", where, 448),
                      patch_size=_side(d, "patch_size", where, 14), max_num_tiles=num("max_num_tiles", int, 4),
                      vision_output_dim=num("vision_output_dim", int, 7680), norm_eps=num("norm_eps", float, 1e-5))
        for key in ("intermediate_layers_indices", "supported_aspect_ratios"):
            if d.get(key) is not None:
                if not isinstance(d[key], (list, tuple)):
                    raise ConfigError(f"{where}: {key}={d[key]!r:.60}: expected a list")
                kwargs[key] = d[key]
        try:
            return cls(**kwargs)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_hf_dict(self) -> dict:
        return {"model_type": "mllama_vision_model", "hidden_size": self.hidden_size, "hidden_act": "gelu",
                "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
                "num_global_layers": self.num_global_layers, "attention_heads": self.num_heads,
                "num_channels": self.num_channels, "image_size": self.image_size, "patch_size": self.patch_size,
                "max_num_tiles": self.max_num_tiles,
                "intermediate_layers_indices": list(self.intermediate_layers_indices),
                "supported_aspect_ratios": [list(r) for r in self.supported_aspect_ratios],
                "vision_output_dim": self.vision_output_dim, "norm_eps": self.norm_eps}


def _side(d: Mapping[str, Any], key: str, where: str, default: int) -> int:
    """image_size / patch_size: an integer, or a square [h, w] pair."""
    value = d.get(key, default)
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"{where}: {key}={value!r}: expected a square size")
        value = value[0]
    return _number({key: value}, key, where)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture and numerics of one Llama model.

    `head_dim` defaults to hidden_size // num_heads; `eos_token_id` is a tuple because Llama 3.x instruct
    models stop on several tokens. `dtype` is the compute dtype, `param_dtype` the storage dtype.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 1
    eos_token_id: Tuple[int, ...] = (2,)
    initializer_range: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    # How attention runs (ATTENTION_KINDS); a setting of this machine, not of the model: checkpoints omit it.
    attention: str = "auto"
    decode_attention: str = "auto"  # DECODE_ATTENTION_KINDS; like `attention`, checkpoints omit it
    # Which released model this came from, if any (informational; the preset name).
    name: str = ""
    # Llama 3.2 Vision (Mllama): the image encoder, and where gated cross-attention layers sit among the text
    # layers, as indices in Hugging Face's numbering (self and cross layers counted together: 0..num_layers +
    # len(cross_attention_layers) - 1). `num_layers` counts the self-attention layers only. The embedding has
    # IMAGE_EMBED_ROWS more rows than the vocabulary (the `<|image|>` token, image_token_id, is one of them).
    vision: Optional[VisionConfig] = None
    cross_attention_layers: Tuple[int, ...] = ()
    image_token_id: Optional[int] = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass normalisation
        if self.num_kv_heads is None:
            set_("num_kv_heads", self.num_heads)
        if self.head_dim is None and self.num_heads and self.num_heads > 0:
            set_("head_dim", self.hidden_size // self.num_heads)
        eos = self.eos_token_id
        if eos is None:
            set_("eos_token_id", ())
        elif isinstance(eos, int) or not hasattr(eos, "__iter__"):
            set_("eos_token_id", (_as_int(eos),))
        else:
            set_("eos_token_id", tuple(_as_int(e) for e in eos))
        if isinstance(self.rope_scaling, Mapping):
            set_("rope_scaling", RopeScaling.from_hf_dict(self.rope_scaling))
        if isinstance(self.vision, Mapping):  # llama_jax.json stores the dataclass as a dict
            try:
                set_("vision", VisionConfig(**self.vision))
            except TypeError as e:
                raise ConfigError(f"LlamaConfig.vision: {e}") from None
        set_("cross_attention_layers", tuple(_as_int(i) for i in self.cross_attention_layers or ()))
        self._validate()

    def _validate(self):
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "max_position_embeddings")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"LlamaConfig.{key}={value!r}: expected a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"LlamaConfig: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads} "
                "(grouped-query attention shares each KV head among num_heads/num_kv_heads query heads)")
        if self.head_dim % 2:
            raise ConfigError(f"LlamaConfig.head_dim={self.head_dim}: RoPE needs an even head dimension")
        if not (self.rms_norm_eps > 0):
            raise ConfigError(f"LlamaConfig.rms_norm_eps={self.rms_norm_eps}: expected a positive number")
        if not (self.rope_theta > 0):
            raise ConfigError(f"LlamaConfig.rope_theta={self.rope_theta}: expected a positive number")
        for key in ("dtype", "param_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ConfigError(f"LlamaConfig.{key}={getattr(self, key)!r}: expected one of {DTYPES}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"LlamaConfig.remat={self.remat!r}: expected one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_KINDS:
            raise ConfigError(f"LlamaConfig.attention={self.attention!r}: expected one of {ATTENTION_KINDS}")
        if self.decode_attention not in DECODE_ATTENTION_KINDS:
            raise ConfigError(f"LlamaConfig.decode_attention={self.decode_attention!r}: expected one of "
                              f"{DECODE_ATTENTION_KINDS}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"LlamaConfig.rope_scaling={self.rope_scaling!r}: expected a RopeScaling or None")
        for tok in ((self.bos_token_id,) if self.bos_token_id is not None else ()) + self.eos_token_id:
            if not isinstance(tok, int) or isinstance(tok, bool) or not 0 <= tok < self.vocab_size:
                raise ConfigError(f"LlamaConfig: special token id {tok} is outside the vocabulary "
                                  f"[0, {self.vocab_size})")
        self._validate_vision()

    def _validate_vision(self):
        if self.vision is None:
            if self.cross_attention_layers or self.image_token_id is not None:
                raise ConfigError("LlamaConfig: cross_attention_layers and image_token_id need a vision config "
                                  "(LlamaConfig.vision)")
            return
        if not isinstance(self.vision, VisionConfig):
            raise ConfigError(f"LlamaConfig.vision={self.vision!r:.60}: expected a VisionConfig or None")
        total = self.num_layers + len(self.cross_attention_layers)
        layers = self.cross_attention_layers
        if not layers or list(layers) != sorted(set(layers)) or not all(
                isinstance(i, int) and 0 <= i < total for i in layers):
            raise ConfigError(f"LlamaConfig.cross_attention_layers={list(layers)}: expected distinct increasing "
                              f"layer indices in [0, {total}) (self and cross layers counted together)")
        token = self.image_token_id
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < self.embed_rows:
            raise ConfigError(f"LlamaConfig.image_token_id={token!r}: expected a token id in [0, {self.embed_rows})")
        if self.tie_word_embeddings:
            raise ConfigError("LlamaConfig: a vision model's output head is never tied to its embedding (the "
                              "embedding has the extra image rows); tie_word_embeddings must be false")

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_groups(self) -> int:
        """Query heads per KV head (G)."""
        return self.num_heads // self.num_kv_heads

    @property
    def is_vision(self) -> bool:
        return self.vision is not None

    @property
    def embed_rows(self) -> int:
        """Rows of the token embedding: the vocabulary, plus the image rows of a vision model."""
        return self.vocab_size + (IMAGE_EMBED_ROWS if self.vision is not None else 0)

    @property
    def total_layers(self) -> int:
        """Self-attention plus cross-attention layers (Hugging Face's num_hidden_layers for Mllama)."""
        return self.num_layers + len(self.cross_attention_layers)

    def self_layer_hf_index(self, i: int) -> int:
        """The Hugging Face layer index of self-attention layer i (cross layers interleave the numbering)."""
        return _self_layer_indices(self)[i]

    def replace(self, **changes) -> "LlamaConfig":
        """A copy with some fields changed (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"LlamaConfig has no field(s) {unknown}; fields are "
                              f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LlamaConfig":
        """The config of a released Llama (e.g. 'llama3.1-8b') or a small test/demo preset ('tiny', ...)."""
        from llama_jax.presets import PRESETS
        if name not in PRESETS:
            import difflib
            close = difflib.get_close_matches(name, PRESETS, n=3)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"unknown preset {name!r}.{hint} Known presets: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], "name": name, **overrides})

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf(cls, path_or_dict: PathOrDict, **overrides) -> "LlamaConfig":
        """Read a Hugging Face `config.json` (a file, a directory holding one, or its dict)."""
        d, where = read_json(path_or_dict, "config.json")
        arch = d.get("architectures") or []
        if d.get("model_type") == "mllama" or "MllamaForConditionalGeneration" in arch:
            return cls._from_hf_mllama(d, where, overrides)
        return cls._from_hf_text(d, where, overrides)

    @classmethod
    def _from_hf_text(cls, d: dict, where: str, overrides: dict) -> "LlamaConfig":
        arch = d.get("architectures") or []
        if d.get("model_type") not in (None, "llama") and "LlamaForCausalLM" not in arch:
            raise ConfigError(f"{where}: model_type={d.get('model_type')!r} is not a Llama model "
                              "(expected model_type 'llama' or architectures ['LlamaForCausalLM'])")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise ConfigError(f"{where}: {flag}=true is not supported (no released Llama uses biases)")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"{where}: missing required key(s) {missing}")
        # Each value's type is checked here, naming the key: int() would quietly truncate a float hidden_size
        # and `or heads` turn num_key_value_heads=0 into "as many as the query heads".
        num = lambda key, kind=int, default=None: _number(d, key, where, kind, default)  # noqa: E731
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "max_position_embeddings", "max_sequence_length"):
            if d.get(key) is not None and num(key) <= 0:
                raise ConfigError(f"{where}: {key}={d[key]!r}: expected a positive integer")
        heads = num("num_attention_heads")
        eos = d.get("eos_token_id", 2)
        for key, value in (("bos_token_id", d.get("bos_token_id", 1)), ("eos_token_id", eos)):
            values = value if isinstance(value, list) and key == "eos_token_id" else [value]
            if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in values):
                raise ConfigError(f"{where}: {key}={value!r:.60}: expected a token id (an integer)"
                                  f"{' or a list of them' if key == 'eos_token_id' else ''}")
        for key in ("rope_scaling", "rope_parameters"):
            if d.get(key) is not None and not isinstance(d[key], Mapping):
                raise ConfigError(f"{where}: {key}={d[key]!r:.60}: expected an object")
        # transformers >= 5 writes theta and scaling together as "rope_parameters" instead of
        # rope_theta + rope_scaling.
        rope_params = dict(d.get("rope_parameters") or {})
        theta = num("rope_theta", float) if d.get("rope_theta") is not None else \
            _number(rope_params, "rope_theta", f"{where}: rope_parameters", float, 10000.0)
        if not isinstance(d.get("tie_word_embeddings", False), bool):
            raise ConfigError(f"{where}: tie_word_embeddings={d['tie_word_embeddings']!r:.60}: expected true or false")
        kwargs = dict(
            vocab_size=num("vocab_size"), hidden_size=num("hidden_size"),
            intermediate_size=num("intermediate_size"), num_layers=num("num_hidden_layers"),
            num_heads=heads, num_kv_heads=num("num_key_value_heads", int, heads),
            head_dim=num("head_dim"),
            rms_norm_eps=num("rms_norm_eps", float, 1e-6),
            rope_theta=theta,
            rope_scaling=RopeScaling.from_hf_dict(d.get("rope_scaling") or rope_params or None,
                                                  f"{where}: rope_scaling"),
            # Llama 1 conversions used max_sequence_length in old transformers versions.
            max_position_embeddings=num("max_position_embeddings") or num("max_sequence_length") or 2048,
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            bos_token_id=d.get("bos_token_id", 1), eos_token_id=eos,
            initializer_range=num("initializer_range", float, 0.02),
        )
        return _construct(cls, kwargs, overrides, where)

    @classmethod
    def _from_hf_mllama(cls, d: dict, where: str, overrides: dict) -> "LlamaConfig":
        """A Llama 3.2 Vision config.json: `text_config` (a Llama 3.1 text model whose num_hidden_layers counts the
        cross-attention layers too) and `vision_config`. Absent keys take MllamaTextConfig's defaults."""
        for key in ("text_config", "vision_config"):
            if not isinstance(d.get(key), Mapping):
                raise ConfigError(f"{where}: model_type 'mllama' needs a {key} object, found {d.get(key)!r:.60}")
        text = dict(d["text_config"])
        cross = text.pop("cross_attention_layers", None) or [3, 8, 13, 18, 23, 28, 33, 38]
        if not isinstance(cross, (list, tuple)) or not all(isinstance(i, int) for i in cross):
            raise ConfigError(f"{where}: text_config.cross_attention_layers={cross!r:.60}: expected a list of "
                              "layer indices")
        for key, default in (("vocab_size", 128256), ("hidden_size", 4096), ("intermediate_size", 14336),
                             ("num_hidden_layers", 40), ("num_attention_heads", 32), ("num_key_value_heads", 8),
                             ("rms_norm_eps", 1e-5), ("max_position_embeddings", 131072),
                             ("bos_token_id", 128000), ("eos_token_id", 128001)):
            text.setdefault(key, default)
        if not (text.get("rope_theta") or (text.get("rope_parameters") or {}).get("rope_theta")):
            text["rope_theta"] = 500000.0
        layers = _number(text, "num_hidden_layers", f"{where}: text_config")
        if layers <= len(cross):
            raise ConfigError(f"{where}: text_config.num_hidden_layers={layers} must exceed the "
                              f"{len(cross)} cross_attention_layers it counts")
        text.update(model_type="llama", architectures=[], num_hidden_layers=layers - len(cross),
                    # transformers never ties Mllama's head: the embedding has the image rows, the head has not.
                    tie_word_embeddings=False)
        vision = VisionConfig.from_hf_dict(d["vision_config"], f"{where}: vision_config")
        image_token = _number(d, "image_token_index", where, int, 128256)
        return cls._from_hf_text(text, f"{where}: text_config", {
            "vision": vision, "cross_attention_layers": tuple(cross), "image_token_id": image_token, **overrides})

    def to_hf_dict(self) -> dict:
        """A `config.json` dict that transformers' LlamaForCausalLM loads (MllamaForConditionalGeneration for a
        vision model)."""
        if self.vision is not None:
            return self._to_hf_mllama()
        eos = list(self.eos_token_id)
        torch_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[self.param_dtype]
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf_dict() if self.rope_scaling else None,
            "vocab_size": self.vocab_size, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "initializer_range": self.initializer_range, "pretraining_tp": 1, "use_cache": True,
            "torch_dtype": torch_dtype,
        }

    def _to_hf_mllama(self) -> dict:
        text = dataclasses.replace(self, vision=None, cross_attention_layers=(), image_token_id=None).to_hf_dict()
        dtype = text.pop("torch_dtype")
        for key in ("architectures", "attention_bias", "mlp_bias", "pretraining_tp", "head_dim"):
            text.pop(key)
        text.update(model_type="mllama_text_model", num_hidden_layers=self.total_layers,
                    cross_attention_layers=list(self.cross_attention_layers),
                    # The released configs pad with <|finetune_right_pad_id|>; transformers' default (128004)
                    # must name an embedding row, so a small test vocabulary writes none.
                    pad_token_id=128004 if self.embed_rows > 128004 else None)
        return {"architectures": ["MllamaForConditionalGeneration"], "model_type": "mllama",
                "image_token_index": self.image_token_id, "text_config": text,
                "vision_config": self.vision.to_hf_dict(), "torch_dtype": dtype}

    # ------------------------------------------------------------------ Meta params.json
    @classmethod
    def from_meta(cls, path_or_dict: PathOrDict, vocab_size: Optional[int] = None, **overrides) -> "LlamaConfig":
        """Read Meta's `params.json`. Llama 2's has vocab_size -1: pass `vocab_size` (the converter takes it
        from the embedding's shape). The MLP width follows Meta's rule from `multiple_of` and
        `ffn_dim_multiplier`; the context length, absent from params.json, follows the model family."""
        d, where = read_json(path_or_dict, "params.json")
        missing = [k for k in ("dim", "n_layers", "n_heads") if k not in d]
        if missing:
            raise ConfigError(f"{where}: missing required key(s) {missing}")
        for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of"):
            if d.get(key) is not None and _number(d, key, where) <= 0:
                raise ConfigError(f"{where}: {key}={d[key]!r}: expected a positive integer")
        for key in ("ffn_dim_multiplier", "norm_eps", "rope_theta", "rope_scaling_factor"):
            _number(d, key, where, float)
        dim, heads = int(d["dim"]), int(d["n_heads"])
        vocab = vocab_size if vocab_size is not None else _number(d, "vocab_size", where, int, -1)
        if vocab is None or int(vocab) <= 0:
            raise ConfigError(f"{where}: vocab_size={vocab} — pass vocab_size= (read it from the tokenizer or "
                              "the tok_embeddings.weight shape)")
        theta = float(d.get("rope_theta", 10000.0))
        scaling = None
        if d.get("use_scaled_rope"):
            # Meta's code scales by 8 for 3.1/3.3 and 32 for the 3.2 1B/3B models; newer params.json files
            # spell the factor out, older ones leave it to the code.
            is_llama32_small = (dim, int(d["n_layers"])) in ((2048, 16), (3072, 28))
            scaling = RopeScaling(
                rope_type="llama3", factor=float(d.get("rope_scaling_factor") or (32.0 if is_llama32_small else 8.0)),
                low_freq_factor=float(d.get("rope_low_freq_factor", 1.0)),
                high_freq_factor=float(d.get("rope_high_freq_factor", 4.0)),
                original_max_position_embeddings=int(d.get("rope_original_max_position_embeddings", 8192)))
        large_vocab = int(vocab) >= 128000
        if scaling is not None:
            max_len = 131072
        elif large_vocab:
            max_len = 8192
        elif theta >= 1e6:
            max_len = 16384  # Code Llama
        elif float(d.get("norm_eps", 1e-5)) <= 1e-6 and "n_kv_heads" not in d:
            max_len = 2048  # Llama 1
        else:
            max_len = 4096
        kwargs = dict(
            vocab_size=int(vocab), hidden_size=dim,
            intermediate_size=meta_ffn_hidden_size(dim, int(d.get("multiple_of", 256)), d.get("ffn_dim_multiplier")),
            num_layers=int(d["n_layers"]), num_heads=heads, num_kv_heads=int(d.get("n_kv_heads") or heads),
            rms_norm_eps=float(d.get("norm_eps", 1e-5)), rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=max_len,
            tie_word_embeddings=bool(scaling is not None and scaling.factor == 32.0),
            bos_token_id=128000 if large_vocab else 1,
            eos_token_id=(128001, 128008, 128009) if large_vocab else (2,),
        )
        if large_vocab and scaling is None:
            kwargs["eos_token_id"] = (128001, 128009)
        return _construct(cls, kwargs, overrides, where)


@functools.lru_cache(maxsize=16)
def _self_layer_indices(config: LlamaConfig) -> Tuple[int, ...]:
    """The Hugging Face indices of the self-attention layers, in order (computed once per config: the converter
    asks for each tensor of each layer)."""
    cross = set(config.cross_attention_layers)
    return tuple(j for j in range(config.total_layers) if j not in cross)


def dtype_of(name):
    """The numpy dtype of a dtype name ("bfloat16" through ml_dtypes), as jnp.dtype(name) gives it."""
    import ml_dtypes
    import numpy as np

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def meta_ffn_hidden_size(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """Meta's FeedForward width: 2/3 of 4*dim, scaled, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(float(ffn_dim_multiplier) * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def _construct(cls, kwargs: dict, overrides: dict, where: str) -> LlamaConfig:
    try:
        return cls(**{**kwargs, **overrides})
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def read_json(path_or_dict: PathOrDict, filename: str) -> Tuple[dict, str]:
    """(the JSON object, where it came from) of a file, a directory holding `filename`, or a dict; ConfigError
    naming the path when it is missing or not JSON."""
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict), filename
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        path = os.path.join(path, filename)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: file not found (expected a {filename})")
    try:
        with open(path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a JSON {type(d).__name__}, expected an object of {filename} keys")
    return d, path


def _as_int(value):
    """numpy integers -> int; anything else unchanged (for _validate to refuse by name)."""
    try:
        return value if isinstance(value, bool) else operator.index(value)
    except TypeError:
        return value


def _number(d: Mapping[str, Any], key: str, where: str, kind=int, default=None):
    """d[key] as `kind` (int: an integer, never a bool or a float; float: any number), `default` when the key
    is absent or null; ConfigError naming the file, key and value otherwise."""
    value = d.get(key)
    if value is None:
        return default
    ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise ConfigError(f"{where}: {key}={value!r:.60}: expected {'an integer' if kind is int else 'a number'}")
    return kind(value)
