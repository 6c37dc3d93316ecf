"""The one registry of checkpoint formats, used by both `llama_jax.load` and the converter.

A format is a directory kind we recognise (`detect`) and either open as a `Source` of tensors (Hugging Face,
Meta: read tensor by tensor, so the converter streams them and the loader places them straight into their
shardings) or load with a loader of its own (a llama_jax checkpoint: Orbax restores it). `find(path)` is the only
place that decides what a path is. A new format is one `register(Format(...))` call with its Source class; see
docs/DESIGN.md.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, List, Optional, Tuple

from llama_jax.config import LlamaConfig
from llama_jax.errors import ConfigError, ConversionError
from llama_jax.io import checkpoint, hub, paths
from llama_jax.io.gguf import GGUFSource, is_gguf
from llama_jax.io.hf import HFSource, is_hf_dir
from llama_jax.io.meta import MetaSource, is_meta_dir
from llama_jax.io.source import TOKENIZER_FILES, Source, check_source

LoadFn = Callable[..., Tuple[LlamaConfig, dict]]  # (path, dtype, mesh, rules) -> (config, params)


@dataclasses.dataclass(frozen=True)
class Format:
    name: str                                         # short name, e.g. "huggingface"
    description: str                                  # what the directory holds, for messages
    detect: Callable[[str], bool]
    source: Optional[Callable[[str], Source]] = None  # open as a tensor Source (convert and load)
    load: Optional[LoadFn] = None                     # or load with its own loader (load only)


FORMATS: List[Format] = []


def register(fmt: Format, first: bool = False) -> None:
    """Teach `llama_jax.load` (and, for a format with a `source`, the converter) a new kind of directory;
    `first` puts it ahead of the built-in kinds."""
    FORMATS.insert(0, fmt) if first else FORMATS.append(fmt)


def resolve(path) -> str:
    """The directory `path` names: hf://org/name[@revision] is fetched through the Hugging Face cache
    (io/hub.py); a gs:// llama_jax checkpoint or training workdir stays in the bucket (Orbax and tensorstore read
    it there, each host only its devices' slices); any other gs:// directory or file (Hugging Face, Meta, GGUF:
    their readers memory-map local files) is copied once into the local cache (io/paths.py); any other path is
    returned as it is."""
    if paths.is_remote(path):
        path = paths.absolute(path)
        if checkpoint.is_checkpoint(path) or checkpoint.is_checkpoint(training_workdir_export(path)):
            return path
        return paths.local_copy(path, None if path.endswith(".gguf") else hub.WEIGHT_PATTERNS + TOKENIZER_FILES)
    return hub.resolve(path)


def find(path: str) -> Format:
    """The first registered format whose `detect(path)` holds; ConversionError naming the known kinds if none."""
    path = resolve(path)
    if paths.is_remote(path):  # resolve() kept it in the bucket: a llama_jax checkpoint or a workdir
        return next(f for f in FORMATS if f.name in ("llama_jax", "workdir") and f.detect(path))
    if not os.path.isdir(path) and not os.path.isfile(path):  # a file: one-file formats (GGUF)
        raise ConversionError(f"{path}: no such {'file' if path.endswith('.gguf') else 'directory'}")
    for fmt in FORMATS:
        if fmt.detect(path):
            return fmt
    raise ConversionError(f"{path}: not a checkpoint llama_jax knows; expected one of: "
                          + "; ".join(f.description for f in FORMATS))


def open_source(path) -> Source:
    """The tensor Source of a convertible directory, checked against the spec (every name and shape)."""
    path = resolve(path)
    fmt = find(path)
    if fmt.source is None:
        readable = "; ".join(f.description for f in FORMATS if f.source is not None)
        raise ConversionError(f"{path}: is {fmt.description}, which is not converted from; expected {readable}")
    try:
        source = fmt.source(path)
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    check_source(source)
    return source


def training_workdir_export(path: str) -> str:
    return paths.join(path, "export")


def _load_training_workdir(path, dtype, mesh, rules):
    return checkpoint.load(training_workdir_export(path), dtype, mesh, rules)


register(Format("llama_jax", "a llama_jax checkpoint (llama_jax.json + params/)", checkpoint.is_checkpoint,
                load=checkpoint.load))
register(Format("huggingface", "a Hugging Face directory (config.json + model.safetensors or an index)", is_hf_dir,
                source=HFSource))
register(Format("meta", "a Meta directory (params.json + consolidated.NN.pth)", is_meta_dir, source=MetaSource))
register(Format("gguf", "a GGUF file (llama.cpp / Ollama, general.architecture = llama)", is_gguf, source=GGUFSource))
# A training workdir (train.py's WORKDIR): its final params are the llama_jax checkpoint in WORKDIR/export.
register(Format("workdir", "a training workdir (WORKDIR/export written by train.py)",
                lambda path: checkpoint.is_checkpoint(training_workdir_export(path)), load=_load_training_workdir))
