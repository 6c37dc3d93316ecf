"""A checkpoint we read weights from, behind one lazy interface, and the check that it holds exactly what the
parameter spec says.

A Source names its tensors in Hugging Face's spelling (the spec's `hf` column: the one spelling every format is
translated into; Meta's names are renamed, merged across model-parallel shards and un-interleaved on read) and
reads one tensor, or a range of its rows, on demand. Nothing here holds more than one tensor.
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.errors import ConversionError, LayoutError
from llama_jax.io import paths
from llama_jax.model import spec

# Files copied with the weights: the tokenizer and chat template, and the generation defaults.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
                   # a vision model's image preprocessing (llama_jax.vision.preprocess reads it) and processor
                   "preprocessor_config.json", "processor_config.json")


class Source:
    """Tensors of one checkpoint, by Hugging Face name. Subclasses set `kind`, `directory`, `config` and the
    readers."""

    kind = "?"
    directory: str
    config: LlamaConfig

    def names(self) -> List[str]:
        raise NotImplementedError

    def shape(self, name: str) -> Tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> np.dtype:
        raise NotImplementedError

    def where(self, name: str) -> str:
        """The file (and, for Meta, the original name) a tensor comes from, for error messages."""
        raise NotImplementedError

    def read(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.read(name)[start:stop]

    def dtype_name(self) -> str:
        """The storage dtype of the weights (float64 -> float32)."""
        counts: Dict[str, int] = {}
        for n in self.names():
            d = np.dtype(self.dtype(n)).name
            counts[d] = counts.get(d, 0) + 1
        best = max(counts, key=counts.get) if counts else "float32"
        return best if best in ("float32", "bfloat16", "float16") else "float32"

    def copy_tokenizer(self, dst_dir: str) -> List[str]:
        """Put the tokenizer files into `dst_dir` (copied from the source directory; a GGUF file rebuilds them
        from its metadata); returns their names."""
        return copy_files(self.directory, dst_dir, tokenizer_files_in(self.directory))

    def ignored(self, name: str) -> bool:
        """A tensor that is not a parameter (old rotary buffers) or a tied head stored anyway."""
        return spec.is_ignored_hf(name) or (name == spec.get("lm_head", self.config).hf
                                            and self.config.tie_word_embeddings)


def check_source(source: Source) -> None:
    """Every tensor the spec needs for the source's config is present with the right shape, and nothing
    unknown is there."""
    config = source.config
    names = set(source.names())
    _check_layer_count(source, names)  # before the spec's names are enumerated for the config's layer counts
    expected = {p.hf_name(i): (p, i) for p in spec.params(config) for i in p.hf_layers(config)}
    unknown = sorted(n for n in names - set(expected) if not source.ignored(n))
    if unknown:
        model = ("Llama model" if config.vision is None else
                 f"Llama 3.2 Vision model with cross_attention_layers={list(config.cross_attention_layers)}")
        raise ConversionError(f"{source.where(unknown[0])}: unknown tensor name {unknown[0]!r} for a {model}"
                              f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}")
    missing = [n for n in expected if n not in names]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"{source.directory}: missing tensor {missing[0]!r}{more}; the config "
                              f"({config.num_layers} layers, tie_word_embeddings={config.tie_word_embeddings}) "
                              "needs it")
    for name, (p, layer) in expected.items():
        try:
            p.check_hf_shape(source.shape(name), config, source.where(name), layer)
        except LayoutError as e:
            raise ConversionError(str(e)) from None


def _check_layer_count(source: Source, names) -> None:
    """The config's layer count against the layers the files hold, so that a config.json claiming 10**9 layers
    is refused at once instead of building 10**9 tensor names (and gigabytes) first."""
    config = source.config
    if config.vision is not None:  # Mllama: the text layers (self + cross) and the two ViT stacks
        counts = (("num_layers + cross_attention_layers", config.total_layers, "language_model.model.layers."),
                  ("vision num_layers", config.vision.num_layers, "vision_model.transformer.layers."),
                  ("vision num_global_layers", config.vision.num_global_layers,
                   "vision_model.global_transformer.layers."))
        for what, count, prefix in counts:
            held = {n[len(prefix):].split(".", 1)[0] for n in names if n.startswith(prefix)}
            if count > len(held):
                raise ConversionError(f"{source.directory}: the config says {what}={count}, but the checkpoint's "
                                      f"files hold tensors for {len(held)} such layer(s)")
        return
    held = {m[1] for m in map(spec.match_hf, names) if m is not None and m[1] is not None}
    if config.num_layers > len(held):
        raise ConversionError(f"{source.directory}: the config says num_layers={config.num_layers}, but "
                              f"the checkpoint's files hold tensors for {len(held)} layer(s)")


def tokenizer_files_in(directory: str) -> List[str]:
    if paths.is_remote(directory):  # a gs:// checkpoint (no symlinks in a bucket)
        present = set(paths.listdir(directory))
        return [f for f in TOKENIZER_FILES if f in present]
    return [f for f in TOKENIZER_FILES if os.path.lexists(os.path.join(directory, f))]


def inside(directory: str, name: str) -> str:
    """The real path of `directory`/`name`, refused (ConversionError) when a symlink takes it outside
    `directory` (a downloaded folder could point tokenizer_config.json at ~/.ssh/id_rsa) or it is not a file."""
    root = os.path.realpath(directory)
    path = os.path.realpath(os.path.join(directory, name))
    if os.path.commonpath([root, path]) != root:
        raise ConversionError(f"{os.path.join(directory, name)}: is a link to {path}, outside the source "
                              f"directory {directory}; refusing to copy it (copy the file itself in)")
    if not os.path.isfile(path):
        raise ConversionError(f"{os.path.join(directory, name)}: not a regular file")
    return path


def copy_files(src_dir: str, dst_dir: str, names: Sequence[str]) -> List[str]:
    """Copy `names` from `src_dir` into `dst_dir` (either may be gs://), each local one checked by `inside`
    first; returns the names."""
    for name in names:
        src = paths.join(src_dir, name) if paths.is_remote(src_dir) else inside(src_dir, name)
        paths.copy_file(src, paths.join(dst_dir, name))
    return list(names)
