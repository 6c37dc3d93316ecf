"""Meta's original checkpoint directories: params.json + consolidated.NN.pth model-parallel shards (+
tokenizer.model). Tensors are renamed to the spec's Hugging Face names, merged across the shards along the axis
their shapes and the config say (`merge_axis`: Llama 3 cuts the embedding by vocabulary, Llama 2 by model
dimension) and their q/k rows un-interleaved to the half-split RoPE order on read. Torch is imported here only;
shards are memory-mapped, so a tensor is read when it is converted."""

from __future__ import annotations

import glob
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from llama_jax.config import LlamaConfig, read_json
from llama_jax.errors import ConversionError
from llama_jax.io.source import Source
from llama_jax.model import spec


def is_meta_dir(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, "params.json"))
            or bool(glob.glob(os.path.join(path, "consolidated.*.pth"))))


def _refuse_vision(params_path: str) -> None:
    """Llama 3.2 Vision's .pth files (params.json with vision_* keys) hold the encoder in Meta's own layout,
    which is not read: the Hugging Face repos of the same models are (refused before the shards are opened)."""
    try:
        params, _ = read_json(params_path, "params.json")
    except Exception:  # noqa: BLE001 - a bad params.json is reported where the config is read
        return
    keys = sorted(k for k in params if isinstance(k, str) and k.startswith("vision_")) if isinstance(
        params, dict) else []
    if keys:
        raise ConversionError(f"{params_path}: a Llama 3.2 Vision checkpoint ({keys[0]} = {params[keys[0]]!r}); "
                              "Meta's .pth layout of a vision model is not read: convert its Hugging Face "
                              "directory (e.g. meta-llama/Llama-3.2-11B-Vision) instead")


class MetaSource(Source):
    """Meta's original directory: params.json + consolidated.NN.pth model-parallel shards (+ tokenizer.model).
    Torch is imported here only; shards are memory-mapped, so a tensor is read when it is converted."""

    kind = "Meta"

    def __init__(self, directory: str):
        try:
            import torch  # only Meta's .pth format needs torch
        except ImportError:
            raise ConversionError(f"{directory}: a Meta checkpoint (consolidated.NN.pth) is read with PyTorch, "
                                  "which is not installed; install it with: pip install torch") from None

        self.directory = directory
        params_path = os.path.join(directory, "params.json")
        if not os.path.isfile(params_path):
            raise ConversionError(f"{params_path}: file not found (a Meta checkpoint needs params.json next to "
                                  "its consolidated.NN.pth files)")
        _refuse_vision(params_path)
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
        params, _ = read_json(params_path, "params.json")  # a ConfigError naming the file (open_source rewraps)
        if not isinstance(params, dict):
            raise ConversionError(f"{params_path}: expected a JSON object, found {type(params).__name__}")
        # Llama 2's params.json says vocab_size -1: the embedding's shards give the vocabulary.
        vocab = params.get("vocab_size", -1)
        vocab = None if isinstance(vocab, int) and vocab > 0 else embedding_vocab(
            [tuple(s["tok_embeddings.weight"].shape) for s in self._shards], params.get("dim"), paths)
        self.config = LlamaConfig.from_meta(params_path, vocab_size=vocab)
        # HF name -> (Meta name, the spec entry): the spec gives the split axis and the rotary permutation
        self._meta_name: Dict[str, Tuple[str, spec.Param]] = {}
        for meta_name in first:
            if meta_name in spec.META_IGNORED:
                continue
            found = spec.match_meta(meta_name)
            if found is None:
                raise ConversionError(f"{paths[0]}: unknown tensor name {meta_name!r} (not a Llama tensor)")
            param, layer = found
            self._meta_name[param.hf_name(layer)] = (meta_name, param)
        for p, shard in zip(paths[1:], self._shards[1:]):
            missing = sorted(set(m for m, _ in self._meta_name.values()) - set(shard))
            if missing:
                raise ConversionError(f"{p}: model-parallel shard is missing tensor {missing[0]!r} "
                                      f"(present in {paths[0]})")
        # HF name -> the axis its shards are concatenated on (None: one copy), from the shapes (see merge_axis)
        self._axis = {name: merge_axis([tuple(s[m].shape) for s in self._shards], param.hf_shape(self.config),
                                       f"{', '.join(paths)} ({m!r})", self.config)
                      for name, (m, param) in self._meta_name.items()}

    def names(self):
        return list(self._meta_name)

    def _parts(self, name):
        meta_name, _ = self._meta_name[name]
        axis = self._axis[name]
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
        rotary = self._meta_name[name][1].rotary_heads
        return spec.meta_to_hf_rotary(w, getattr(self.config, rotary)) if rotary else w


def embedding_vocab(shapes: List[Tuple[int, ...]], dim, paths: List[str]) -> int:
    """The vocabulary size from the tok_embeddings shards' shapes, for a params.json without one. Llama 3's
    VocabParallelEmbedding cuts the rows (each shard [vocab/n, dim]), Llama 2's ParallelEmbedding the columns
    (each [vocab, dim/n]); with `dim` from params.json at most one of the two fits."""
    n, where = len(shapes), f"{', '.join(paths)} ('tok_embeddings.weight')"
    if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
        raise ConversionError(f"{paths[0]}: params.json dim={dim!r}: expected a positive integer")
    if any(len(s) != 2 or s != shapes[0] for s in shapes):
        raise ConversionError(f"{where}: model-parallel shards of shapes {shapes}; expected n equal 2-D shards")
    rows, cols = shapes[0]
    fits = [vocab for vocab, ok in ((rows * n, cols == dim), (rows, cols * n == dim)) if ok]
    if len(fits) != 1:
        what = "both" if fits else "neither"
        raise ConversionError(f"{where}: {n} shards of shape {shapes[0]} fit {what} a split by vocabulary "
                              f"([vocab/{n}, {dim}]) and {'' if fits else 'nor '}by model dimension "
                              f"([vocab, {dim}/{n}]) for dim={dim} (params.json)")
    return fits[0]


def merge_axis(shapes: List[Tuple[int, ...]], expected: Tuple[int, ...], where: str,
               config: LlamaConfig) -> Optional[int]:
    """The axis along which Meta's model-parallel shards of one tensor concatenate to `expected` (the spec's
    [out, in] shape for the config), or None when each shard is the whole tensor (norms; one shard). Decided
    from the shapes, not assumed: Llama 3 and Llama 2 cut the embedding differently (see embedding_vocab). A
    shape that fits no axis, or more than one, is refused with the shard shapes and the config."""
    expected = tuple(expected)
    if len(shapes) == 1 or all(s == expected for s in shapes):
        return None
    fits = [axis for axis in range(len(expected))
            if all(len(s) == len(expected) for s in shapes)
            and sum(s[axis] for s in shapes) == expected[axis]
            and all(s[:axis] + s[axis + 1:] == expected[:axis] + expected[axis + 1:] for s in shapes)]
    if len(fits) != 1:
        raise ConversionError(
            f"{where}: model-parallel shards of shapes {shapes} concatenate to the expected {expected} along "
            f"{'more than one axis' if fits else 'no axis'} (hidden_size={config.hidden_size}, "
            f"vocab_size={config.vocab_size}, intermediate_size={config.intermediate_size}, "
            f"num_heads={config.num_heads}, num_kv_heads={config.num_kv_heads})")
    return fits[0]
