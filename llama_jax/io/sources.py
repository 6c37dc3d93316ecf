"""Checkpoint directories we read weights from, behind one lazy interface, plus the block reader that turns
their tensors into llama_jax's stacked layout one piece at a time.

A source names its tensors in Hugging Face's spelling (Meta's are renamed, merged across model-parallel
shards and un-interleaved on read) and reads one tensor, or a range of its rows, on demand. Nothing here holds
more than one tensor; the converter and the sharded loader both go through `read_block`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from llama_jax.io import layout
from llama_jax.config import ConfigError, LlamaConfig
from llama_jax.io.safetensors_io import SafetensorsError, SafetensorsFile
from llama_jax.errors import ConversionError  # noqa: F401 (also re-exported)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")
_HF_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")  # old HF buffers
_BLOCK_BYTES = 64 << 20  # embedding / output rows are converted in blocks of about this size


# ---------------------------------------------------------------------------------------------- sources
class Source:
    """Tensors of one checkpoint directory, by HF name. Subclasses fill `config` and the readers."""

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

    def ignored(self, name: str) -> bool:
        return bool(_HF_IGNORED.match(name)) or (name == "lm_head.weight" and self.config.tie_word_embeddings)


class HFSource(Source):
    """A Hugging Face directory: config.json + model.safetensors or sharded files with an index."""

    kind = "Hugging Face"

    def __init__(self, directory: str):
        self.directory = directory
        self.config = LlamaConfig.from_hf(os.path.join(directory, "config.json"))
        self._files: Dict[str, SafetensorsFile] = {}
        self._file_of: Dict[str, str] = {}
        index_path = os.path.join(directory, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            self._read_index(index_path)
        elif os.path.isfile(os.path.join(directory, "model.safetensors")):
            f = self._open(os.path.join(directory, "model.safetensors"))
            self._file_of = {n: f.path for n in f.tensors}
        else:
            other = sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.bin")))
            hint = f" (found {other[:3]}; only safetensors weights are read)" if other else ""
            raise ConversionError(f"{directory}: no model.safetensors or model.safetensors.index.json{hint}")

    def _read_index(self, index_path: str) -> None:
        try:
            with open(index_path) as fh:
                weight_map = json.load(fh)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConversionError(f"{index_path}: not a safetensors index (expected a 'weight_map'; {e})") from None
        root = os.path.realpath(self.directory)
        for name, filename in weight_map.items():
            path = os.path.realpath(os.path.join(self.directory, filename))
            if os.path.commonpath([root, path]) != root:
                raise ConversionError(f"{index_path}: tensor {name!r} names file {filename!r}, which is outside "
                                      f"the checkpoint directory {self.directory}")
            if not os.path.isfile(path):
                raise ConversionError(f"{index_path}: tensor {name!r} is in {filename!r}, but "
                                      f"{os.path.join(self.directory, filename)} does not exist")
            f = self._open(path)
            if name not in f.tensors:
                raise ConversionError(f"{index_path}: says tensor {name!r} is in {filename!r}, but that file "
                                      "does not hold it")
            self._file_of[name] = path

    def _open(self, path: str) -> SafetensorsFile:
        if path not in self._files:
            try:
                self._files[path] = SafetensorsFile(path)
            except SafetensorsError as e:
                raise ConversionError(str(e)) from None
        return self._files[path]

    def names(self):
        return list(self._file_of)

    def shape(self, name):
        return self._files[self._file_of[name]].shape(name)

    def dtype(self, name):
        return self._files[self._file_of[name]].dtype(name)

    def where(self, name):
        return self._file_of[name]

    def read(self, name):
        return self.read_rows(name, 0, self.shape(name)[0])

    def read_rows(self, name, start, stop):
        try:
            return self._files[self._file_of[name]].read_rows(name, start, stop)
        except SafetensorsError as e:
            raise ConversionError(str(e)) from None


class MetaSource(Source):
    """Meta's original directory: params.json + consolidated.NN.pth model-parallel shards (+ tokenizer.model).
    Torch is imported here only; shards are memory-mapped, so a tensor is read when it is converted."""

    kind = "Meta"

    def __init__(self, directory: str):
        import torch  # only Meta's .pth format needs torch

        self.directory = directory
        params_path = os.path.join(directory, "params.json")
        if not os.path.isfile(params_path):
            raise ConversionError(f"{params_path}: file not found (a Meta checkpoint needs params.json next to "
                                  "its consolidated.NN.pth files)")
        paths = sorted(glob.glob(os.path.join(directory, "consolidated.*.pth")))
        if not paths:
            raise ConversionError(f"{directory}: no consolidated.NN.pth files next to params.json")
        self._paths, self._shards = paths, []
        for p in paths:
            try:
                self._shards.append(torch.load(p, weights_only=True, mmap=True, map_location="cpu"))
            except Exception as e:  # torch raises many types for a damaged zip
                raise ConversionError(f"{p}: cannot be read as a PyTorch checkpoint (truncated or damaged?): "
                                      f"{type(e).__name__}: {e}") from None
        first = self._shards[0]
        if "tok_embeddings.weight" not in first:
            raise ConversionError(f"{paths[0]}: has no tensor 'tok_embeddings.weight'")
        try:
            with open(params_path) as fh:
                params = json.load(fh)
        except json.JSONDecodeError as e:
            raise ConversionError(f"{params_path}: not valid JSON ({e})") from None
        # Llama 2's params.json says vocab_size -1: the embedding's rows are the vocabulary.
        vocab = None if int(params.get("vocab_size", -1) or -1) > 0 else int(first["tok_embeddings.weight"].shape[0])
        self.config = LlamaConfig.from_meta(params_path, vocab_size=vocab)
        self._meta_name: Dict[str, Tuple[str, Optional[int]]] = {}
        for meta_name in first:
            if meta_name in layout.META_IGNORED:
                continue
            try:
                hf_name, axis = layout.meta_name_to_hf(meta_name)
            except KeyError:
                raise ConversionError(f"{paths[0]}: unknown tensor name {meta_name!r} (not a Llama tensor)") from None
            self._meta_name[hf_name] = (meta_name, axis)
        for p, shard in zip(paths[1:], self._shards[1:]):
            missing = sorted(set(m for m, _ in self._meta_name.values()) - set(shard))
            if missing:
                raise ConversionError(f"{p}: model-parallel shard is missing tensor {missing[0]!r} "
                                      f"(present in {paths[0]})")

    def names(self):
        return list(self._meta_name)

    def _parts(self, name):
        meta_name, axis = self._meta_name[name]
        return meta_name, axis, [s[meta_name] for s in (self._shards if axis is not None else self._shards[:1])]

    def shape(self, name):
        _, axis, parts = self._parts(name)
        shape = list(parts[0].shape)
        if axis is not None:
            shape[axis] = sum(int(p.shape[axis]) for p in parts)
        return tuple(shape)

    def dtype(self, name):
        import ml_dtypes
        import torch

        t = self._parts(name)[2][0]
        return np.dtype(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else np.dtype(str(t.dtype).split(".")[-1])

    def where(self, name):
        meta_name, axis, _ = self._parts(name)
        files = self._paths if axis is not None else self._paths[:1]
        return f"{', '.join(files)} ({meta_name!r})"

    def read(self, name):
        import ml_dtypes
        import torch

        _, axis, parts = self._parts(name)
        t = torch.cat(parts, dim=axis) if len(parts) > 1 else parts[0].contiguous()
        w = (t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16
             else t.numpy()).copy()
        if name.endswith("self_attn.q_proj.weight"):
            w = layout.meta_to_hf_rotary(w, self.config.num_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = layout.meta_to_hf_rotary(w, self.config.num_kv_heads)
        return w


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def is_meta_dir(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, "params.json"))
            or bool(glob.glob(os.path.join(path, "consolidated.*.pth"))))


def open_source(path: str) -> Source:
    """The Source for a HF or Meta directory, checked against its config (names and shapes)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: no such directory")
    try:
        if os.path.isfile(os.path.join(path, "config.json")):
            source: Source = HFSource(path)
        elif is_meta_dir(path):
            source = MetaSource(path)
        else:
            raise ConversionError(f"{path}: neither a Hugging Face checkpoint (no config.json) nor a Meta one "
                                  "(no params.json)")
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    check_source(source)
    return source


def check_source(source: Source) -> None:
    """Every tensor the config needs is present with the right shape, and nothing unknown is there."""
    config = source.config
    expected = {e.hf_name: e for e in layout.hf_entries(config)}
    names = set(source.names())
    unknown = sorted(n for n in names - set(expected) if not source.ignored(n))
    if unknown:
        raise ConversionError(f"{source.where(unknown[0])}: unknown tensor name {unknown[0]!r} for a Llama "
                              f"model{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}")
    missing = [n for n in expected if n not in names]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"{source.directory}: missing tensor {missing[0]!r}{more}; the config "
                              f"({config.num_layers} layers, tie_word_embeddings={config.tie_word_embeddings}) "
                              "needs it")
    for name, entry in expected.items():
        try:
            layout.check_shape(entry, source.shape(name), config, source.where(name))
        except layout.LayoutError as e:
            raise ConversionError(str(e)) from None


# ---------------------------------------------------------------------------------------------- leaves
@dataclasses.dataclass(frozen=True)
class Leaf:
    """One parameter array of our tree and the HF tensors it is made of (one per layer if stacked).
    It is written in blocks along `block_axis` of `block` entries (None: whole)."""

    path: Tuple[str, ...]
    shape: Tuple[int, ...]
    entries: Tuple[layout.Entry, ...]
    block_axis: Optional[int]
    block: int

    @property
    def name(self) -> str:
        return ".".join(self.path)

    @property
    def stacked(self) -> bool:
        return self.entries[0].layer is not None

    def blocks(self) -> List[Tuple[slice, ...]]:
        """Index tuples that tile the whole array, one block each."""
        if self.block_axis is None:
            return [tuple(slice(None) for _ in self.shape)]
        n, out = self.shape[self.block_axis], []
        for s in range(0, n, self.block):
            index = [slice(None)] * len(self.shape)
            index[self.block_axis] = slice(s, min(s + self.block, n))
            out.append(tuple(index))
        return out


def leaves(config: LlamaConfig, itemsize: int = 4) -> List[Leaf]:
    """Our parameter leaves in HF file order, with their shapes (see the layout in model.py)."""
    from llama_jax.model.transformer import param_shapes

    shapes = {tuple(str(getattr(k, "key", k)) for k in path): tuple(s.shape)
              for path, s in _flatten(param_shapes(config))}
    by_path: Dict[Tuple[str, ...], List[layout.Entry]] = {}
    for e in layout.hf_entries(config):
        by_path.setdefault(e.path, []).append(e)
    rows = max(1, _BLOCK_BYTES // (config.hidden_size * itemsize))
    out = []
    for path, entries in by_path.items():
        kind = entries[0].kind
        if entries[0].layer is not None:
            axis, block = 0, 1
        elif kind == "embed":
            axis, block = 0, rows
        elif kind == "lm_head":
            axis, block = 1, rows
        else:
            axis, block = None, 0
        out.append(Leaf(path, shapes[path], tuple(entries), axis, block))
    return out


def _flatten(tree):
    import jax

    return jax.tree_util.tree_flatten_with_path(tree)[0]


def read_block(source: Source, leaf: Leaf, index: Tuple[slice, ...], dtype) -> np.ndarray:
    """leaf[index] in our layout and `dtype`, reading only the layers / rows that index covers."""
    config = source.config
    index = tuple(index) + (slice(None),) * (len(leaf.shape) - len(index))
    if leaf.stacked:
        layers = range(*index[0].indices(leaf.shape[0]))
        parts = [layout.hf_to_ours(leaf.entries[i], source.read(leaf.entries[i].hf_name), config)[index[1:]]
                 .astype(dtype, copy=False) for i in layers]
        if len(parts) == 1:  # the converter's case: one layer, no extra copy
            return parts[0][None]
        return np.stack(parts) if parts else np.zeros((0,) + leaf.shape[1:], dtype)
    entry = leaf.entries[0]
    if entry.kind == "embed":
        s, e, _ = index[0].indices(leaf.shape[0])
        return source.read_rows(entry.hf_name, s, e)[:, index[1]].astype(dtype, copy=False)
    if entry.kind == "lm_head":  # ours [D, V] = HF [V, D].T: our columns are HF rows
        s, e, _ = index[1].indices(leaf.shape[1])
        return source.read_rows(entry.hf_name, s, e).T[index[0]].astype(dtype, copy=False)
    return layout.hf_to_ours(entry, source.read(entry.hf_name), config)[index].astype(dtype, copy=False)


def dtype_of(name: str) -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def tokenizer_files_in(directory: str) -> List[str]:
    return [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(directory, f))]


def leaf_by_name(leaves_: Sequence[Leaf]) -> Dict[str, Leaf]:
    return {leaf.name: leaf for leaf in leaves_}
