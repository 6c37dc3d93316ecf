"""Run configs: nested dataclasses, recipe files under configs/, and dotted `key=value` overrides.

A recipe is a Python file with `get_config() -> RunConfig`. On the command line, `key=value` changes any
field (`steps=100`, `mesh.fsdp=8`, `optim.lr=3e-4`, `lora.targets=q,v`); values are parsed and checked
against the field's type, and an unknown key is an error that names the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import typing
from typing import Any, Dict, List, Sequence, Tuple

from llama_jax.errors import RunConfigError, StorageError
from llama_jax.io import paths


@dataclasses.dataclass
class ModelSection:
    preset: str = "small"         # a name from llama_jax/presets.py (ignored with init_from: the checkpoint's)
    dtype: str = "float32"        # compute dtype; "bfloat16" = mixed precision with param_dtype float32
    param_dtype: str = "float32"  # master weights (and optimizer state); "bfloat16" for all-bf16 training
    remat: str = "none"           # none | full | dots | dots_no_batch | save_qkv_proj
    attention: str = "auto"       # auto (splash on a TPU, xla elsewhere) | xla | splash (Pallas; interpret mode off TPU)
    vocab_size: int = 0           # 0: the preset's (or the checkpoint's)


@dataclasses.dataclass
class DataSection:
    path: str = ""                # token directory (python -m llama_jax.data prepare); "" = built-in corpus
    train_split: str = "train"
    eval_split: str = "val"
    threads: int = 2              # grain read threads (order does not depend on it)
    prefetch: int = 4


@dataclasses.dataclass
class OptimSection:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1     # cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 20
    weight_decay: float = 0.1     # AdamW, not applied to norms (weight-decay mask)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0        # global-norm clipping; 0 disables


@dataclasses.dataclass
class MeshSection:
    data: int = 1
    fsdp: int = -1                # -1: every device not used by the other axes
    tensor: int = 1


@dataclasses.dataclass
class LoraSection:
    rank: int = 0                 # 0: full fine-tuning (no LoRA)
    alpha: float = 16.0
    targets: Tuple[str, ...] = ("q", "k", "v", "o")  # any of q, k, v, o, gate, up, down
    base_quant: str = "none"      # QLoRA: the frozen base stored as int8 or nf4 (4-bit NormalFloat); none: float


@dataclasses.dataclass
class DpoSection:
    beta: float = 0.1             # DPO's KL strength: loss = -log sigmoid(beta * (policy - reference) margin)


@dataclasses.dataclass
class RunConfig:
    workdir: str = "runs/default"
    init_from: str = ""           # a llama_jax checkpoint or a Hugging Face / Meta directory
    seed: int = 0
    steps: int = 200
    batch_size: int = 16          # global, in sequences
    seq_len: int = 128
    grad_accum: int = 1           # micro-batches per step (batch_size must divide by it)
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 1
    eval_every: int = 50          # 0 disables periodic evaluation
    eval_batches: int = 4
    eval_tasks: Tuple[str, ...] = ()  # lm-eval tasks run on the final params (llama_jax.eval), e.g. arc_easy,hellaswag
    eval_limit: float = 0.0       # documents per lm-eval task (0: all; a fraction when < 1)
    eval_include_path: str = ""   # a folder of local lm-eval task YAMLs
    peak_flops: float = 0.0       # per device, for MFU; 0: look the device kind up in llama_jax.model.flops
    sample_tokens: int = 48       # length of the sample printed at the end (0: none)
    sample_prompt: str = "The"
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    objective: str = "sft"        # sft: next-token cross entropy; dpo: preference pairs (data from prepare)
    dpo: DpoSection = dataclasses.field(default_factory=DpoSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "RunConfig":
        return apply_overrides(cls(), _flatten(d), parse=False)


# ------------------------------------------------------------------------------------------------ keys
def _fields(obj) -> Dict[str, Any]:
    """{field name: resolved type} of a config dataclass."""
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def valid_keys(cfg=None) -> List[str]:
    """Every dotted key a RunConfig accepts, e.g. 'steps', 'mesh.fsdp', 'optim.lr'."""
    cfg = cfg if cfg is not None else RunConfig()
    keys = []
    for name, f in _fields(cfg).items():
        value = getattr(cfg, name)
        if dataclasses.is_dataclass(value):
            keys += [f"{name}.{k}" for k in valid_keys(value)]
        else:
            keys.append(name)
    return keys


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _parse(key: str, raw: Any, typ, parse: bool):
    """Convert `raw` (a command-line string, or a JSON value when parse=False) to the field type."""
    origin = typing.get_origin(typ)
    try:
        if typ is bool:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "false", "0", "no"):
                return raw.lower() in ("true", "1", "yes")
            raise ValueError
        if typ is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw) if not isinstance(raw, str) else int(raw, 0)
        if typ is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if typ is str:
            return str(raw)
        if origin in (tuple, list):
            items = [s.strip() for s in raw.split(",") if s.strip()] if isinstance(raw, str) else list(raw)
            return tuple(str(i) for i in items)
    except (TypeError, ValueError):
        pass
    name = getattr(typ, "__name__", str(typ))
    raise RunConfigError(f"{key}={raw!r}: expected a value of type {name}")


def set_key(cfg: RunConfig, key: str, raw: Any, parse: bool = True) -> RunConfig:
    """A copy of `cfg` with the dotted `key` set to `raw` (parsed and type-checked)."""
    parts = key.split(".")
    obj, owners = cfg, []
    for i, part in enumerate(parts):
        fields = _fields(obj) if dataclasses.is_dataclass(obj) else {}
        if part not in fields or (i < len(parts) - 1 and not dataclasses.is_dataclass(getattr(obj, part))) or (
                i == len(parts) - 1 and dataclasses.is_dataclass(getattr(obj, part))):
            close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.0)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RunConfigError(f"unknown config key {key!r}{hint}")
        owners.append((obj, part, fields[part]))
        obj = getattr(obj, part)
    value = _parse(key, raw, owners[-1][2], parse)
    # rebuild the path bottom-up (dataclasses.replace keeps every other field)
    for owner, part, _ in reversed(owners):
        value = dataclasses.replace(owner, **{part: value})
    return value


def apply_overrides(cfg: RunConfig, overrides, parse: bool = True) -> RunConfig:
    """Apply {key: value} or ["key=value", ...] overrides."""
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for text in overrides:
            if "=" not in text:
                raise RunConfigError(f"{text!r}: expected key=value (e.g. steps=100, mesh.fsdp=8)")
            k, v = text.split("=", 1)
            items.append((k.strip(), v))
    for k, v in items:
        cfg = set_key(cfg, k, v, parse=parse)
    return validate(cfg)


def _get(cfg: RunConfig, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: RunConfig) -> RunConfig:
    """Cross-field checks that need no devices (device-dependent checks happen in the trainer)."""
    for key in ("workdir", "init_from", "data.path"):  # a gs:// path's bucket name, before any request is made
        value = _get(cfg, key)
        if paths.is_remote(value):
            try:
                paths.split(value)
            except StorageError as e:
                raise RunConfigError(f"{key}={value!r}: {e}") from None
    for key in ("steps", "batch_size", "seq_len", "grad_accum", "checkpoint_every", "keep_checkpoints",
                "log_every"):
        if getattr(cfg, key) <= 0:
            raise RunConfigError(f"{key}={getattr(cfg, key)}: expected a positive integer")
    for key in ("seed", "eval_every", "eval_batches", "optim.lr", "optim.warmup_steps", "data.threads",
                "data.prefetch"):
        value = _get(cfg, key)
        if not value >= 0:  # also refuses a NaN learning rate
            raise RunConfigError(f"{key}={value}: expected a value >= 0")
    for key in ("optim.b1", "optim.b2"):
        if not 0 <= _get(cfg, key) < 1:
            raise RunConfigError(f"{key}={_get(cfg, key)}: expected a value in [0, 1) (Adam's decay rate)")
    if cfg.batch_size % cfg.grad_accum:
        raise RunConfigError(f"batch_size={cfg.batch_size} is not divisible by grad_accum={cfg.grad_accum}")
    bad = sorted(set(cfg.lora.targets) - {"q", "k", "v", "o", "gate", "up", "down"})
    if bad:
        raise RunConfigError(f"lora.targets: unknown projection(s) {bad}; choose from q,k,v,o,gate,up,down")
    if cfg.lora.rank < 0:
        raise RunConfigError(f"lora.rank={cfg.lora.rank}: expected >= 0")
    if cfg.lora.base_quant not in ("none", "int8", "nf4"):
        raise RunConfigError(f"lora.base_quant={cfg.lora.base_quant!r}: expected none, int8 or nf4")
    if cfg.lora.base_quant != "none" and cfg.lora.rank == 0:
        raise RunConfigError(f"lora.base_quant={cfg.lora.base_quant}: a quantized base needs LoRA (lora.rank > 0)")
    if cfg.objective not in ("sft", "dpo"):
        raise RunConfigError(f"objective={cfg.objective!r}: expected sft or dpo")
    if cfg.objective == "dpo" and (cfg.batch_size // cfg.grad_accum) % 2:
        raise RunConfigError(f"objective=dpo: batch_size={cfg.batch_size} / grad_accum={cfg.grad_accum} must be "
                             "even (each preference pair is two sequences: chosen and rejected)")
    if cfg.dpo.beta <= 0:
        raise RunConfigError(f"dpo.beta={cfg.dpo.beta}: expected > 0")
    if cfg.eval_limit < 0:
        raise RunConfigError(f"eval_limit={cfg.eval_limit}: expected 0 (all documents), a count, or a fraction < 1")
    return cfg


def load_recipe(path: str) -> RunConfig:
    """Run `get_config()` of a recipe file (e.g. configs/llama3.1-8b.py)."""
    if not os.path.isfile(path):
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
        known = sorted(f for f in os.listdir(here) if f.endswith(".py")) if os.path.isdir(here) else []
        raise RunConfigError(f"{path}: config file not found; recipes in configs/: {', '.join(known)}")
    spec = importlib.util.spec_from_file_location("llama_jax_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise RunConfigError(f"{path}: a recipe must define get_config() -> RunConfig")
    cfg = module.get_config()
    if not isinstance(cfg, RunConfig):
        raise RunConfigError(f"{path}: get_config() returned {type(cfg).__name__}, expected a RunConfig")
    return validate(cfg)


def build(config_path: str = "", overrides: Sequence[str] = ()) -> RunConfig:
    """The run config of the command line: a recipe (default configs/small.py's values) plus overrides."""
    cfg = load_recipe(config_path) if config_path else RunConfig()
    return apply_overrides(cfg, list(overrides))
