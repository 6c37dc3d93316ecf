"""A run's data, model config and mesh, resolved from its RunConfig and checked against each other before
anything is compiled: `resolve(cfg) -> Setup`. Every problem is a TrainError naming the key at fault."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax

from llama_jax.config import LlamaConfig
from llama_jax.errors import MeshError, StorageError, TrainError
from llama_jax.io import paths
from llama_jax.parallel import distributed
from llama_jax.parallel.sharding import batch_shards, make_mesh, mesh_axes_of, param_shardings
from llama_jax.training import data as data_lib
from llama_jax.training.run_config import RunConfig


@dataclasses.dataclass
class Setup:
    """Everything resolved before compilation."""
    cfg: RunConfig
    model: LlamaConfig
    data_path: str
    meta: dict
    mesh: Any
    tokenizer_path: Optional[str]  # the directory of the data's tokenizer files


def model_config(cfg: RunConfig) -> LlamaConfig:
    """The model of a from-scratch run: the preset with the run's dtype/remat/vocab overrides."""
    m = cfg.model
    kw = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, attention=m.attention)
    if m.vocab_size:
        kw["vocab_size"] = m.vocab_size
    return LlamaConfig.from_preset(m.preset, **kw)


def resolve(cfg: RunConfig, log=print) -> Setup:
    """Data, model and mesh of the run, checked against each other (nothing is compiled here)."""
    if cfg.init_from:
        model = _init_config(cfg.init_from).replace(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                                                    remat=cfg.model.remat, attention=cfg.model.attention)
    else:
        model = model_config(cfg)
    data_path = _data_path(cfg, model, log)
    meta = _check_data(cfg, model, data_path)
    if cfg.seq_len > model.max_position_embeddings:
        raise TrainError(f"seq_len={cfg.seq_len} exceeds the model's max_position_embeddings="
                         f"{model.max_position_embeddings}")
    mesh = build_mesh(cfg, model)
    if cfg.batch_size % jax.process_count():
        raise TrainError(f"batch_size={cfg.batch_size} is not divisible by the {jax.process_count()} processes")
    return Setup(cfg, model, data_path, meta, mesh, data_path if data_lib.has_tokenizer(data_path) else None)


def _data_path(cfg: RunConfig, model: LlamaConfig, log=print) -> str:
    """data.path, or the built-in corpus (tokenized for the model's vocabulary) when it is empty."""
    from llama_jax.training import corpus

    if cfg.data.path and paths.is_remote(cfg.data.path):
        # the token files are memory-mapped and read at random rows: each host copies them once into its
        # local cache (io/paths.py; again only when an object changes) rather than one request per sequence
        try:
            return paths.local_copy(cfg.data.path, say=log if jax.process_index() == 0 else lambda *a: None)
        except StorageError as e:
            raise TrainError(f"data.path={cfg.data.path!r}: {e}") from None
    if cfg.data.path:
        if not os.path.isdir(cfg.data.path):
            raise TrainError(f"data.path={cfg.data.path!r}: directory not found (make one with "
                             "`python -m llama_jax.data prepare --tokenizer TOK --out DIR FILES...`)")
        return cfg.data.path
    # every process builds it (deterministically; once per host or shared cache) and checks all got the same
    path = corpus.ensure_default_corpus(model.vocab_size, verbose=jax.process_index() == 0)
    differ = distributed.differing_processes(corpus.fingerprint(path))
    if differ:
        raise TrainError(f"{path}: the built-in corpus built by process(es) {differ} differs from process 0's "
                         "(another Python version?); give data.path, a token directory every host can read")
    return path


def _check_data(cfg: RunConfig, model: LlamaConfig, data_path: str) -> dict:
    """The token directory's meta.json, once its splits hold a sequence and its vocabulary fits the model."""
    try:
        meta = data_lib.read_meta(data_path)
        from llama_jax.training.preference_data import PreferencePairs
        source = PreferencePairs if cfg.objective == "dpo" else data_lib.PackedSequences
        for split in (cfg.data.train_split,) + ((cfg.data.eval_split,) if cfg.eval_every else ()):
            source(data_path, split, cfg.seq_len)  # checks files and length now
    except data_lib.DataError as e:
        raise TrainError(str(e)) from None
    if meta.get("kind") == "preference" and cfg.objective != "dpo":
        raise TrainError(f"{data_path}: preference pairs (chosen/rejected) train with objective=dpo, not "
                         f"objective={cfg.objective}")
    if meta["vocab_size"] > model.vocab_size:
        raise TrainError(f"{data_path}: the tokenizer has {meta['vocab_size']} tokens but the model's vocabulary "
                         f"has {model.vocab_size} ({cfg.init_from or 'preset ' + cfg.model.preset}); tokenize with "
                         "the model's tokenizer or set model.vocab_size")
    for split in (cfg.data.train_split,) + ((cfg.data.eval_split,) if cfg.eval_every else ()):
        top = data_lib.max_token_id(data_path, split, meta)  # an id past the vocabulary trains into NaN later
        if top >= model.vocab_size:
            raise TrainError(f"{os.path.join(data_path, split + '.bin')}: holds token id {top}, outside the model's "
                             f"vocabulary of {model.vocab_size} (ids 0..{model.vocab_size - 1}); tokenize with the "
                             "model's tokenizer or set model.vocab_size")
    return meta


def build_mesh(cfg: RunConfig, model: LlamaConfig):
    """The mesh of cfg.mesh (one size per mesh axis, passed by name: a new axis needs no change here), once
    the model's parameters and each micro-batch split over it."""
    try:
        mesh = make_mesh(**dataclasses.asdict(cfg.mesh))
        param_shardings(model, mesh)  # raises MeshError when a dimension cannot be split
    except MeshError as e:
        raise TrainError(f"config does not fit the mesh: {e}") from None
    shards, micro = batch_shards(mesh), cfg.batch_size // cfg.grad_accum
    if micro % shards:
        raise TrainError(f"batch_size={cfg.batch_size} / grad_accum={cfg.grad_accum} = {micro} sequences per "
                         f"micro-batch cannot be split over mesh {'×'.join(mesh_axes_of('batch'))} = {shards} "
                         f"devices; use a multiple of {shards * cfg.grad_accum}")
    return mesh


def _init_config(path: str) -> LlamaConfig:
    """The model config of an init_from checkpoint, read from its metadata (no weights are loaded)."""
    from llama_jax.io import checkpoint, formats

    try:  # hf://org/name: a local snapshot in the Hugging Face cache; gs://: io/formats.py's resolve
        path = formats.resolve(path)
    except StorageError as e:
        raise TrainError(f"init_from={path!r}: {e}") from None
    if not paths.isdir(path):
        raise TrainError(f"init_from={path!r}: not found (expected a llama_jax checkpoint, a training workdir, or "
                         "a Hugging Face / Meta directory)")
    for candidate in (path, paths.join(path, "export")):
        if checkpoint.is_checkpoint(candidate):
            return checkpoint.read_metadata(candidate)[1]
    try:
        return formats.open_source(path).config
    except Exception as e:  # noqa: BLE001 - any unreadable source is the user's path problem
        raise TrainError(f"init_from={path!r}: cannot read its model config: {e}") from None
