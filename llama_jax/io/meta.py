"""Meta's original checkpoint directories: params.json + consolidated.NN.pth model-parallel shards (+
tokenizer.model). Tensors are renamed to the spec's Hugging Face names, merged along the spec's `meta_split` axis
and their q/k rows un-interleaved to the half-split RoPE order on read. Torch is imported here only; shards are
memory-mapped, so a tensor is read when it is converted."""

from __future__ import annotations

import glob
import os
from typing import Dict, Tuple

import numpy as np

from llama_jax.config import LlamaConfig, read_json
from llama_jax.errors import ConversionError
from llama_jax.io.source import Source
from llama_jax.model import spec


def is_meta_dir(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, "params.json"))
            or bool(glob.glob(os.path.join(path, "consolidated.*.pth"))))


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
        params, _ = read_json(params_path, "params.json")  # a ConfigError naming the file (open_source rewraps)
        # Llama 2's params.json says vocab_size -1: the embedding's rows are the vocabulary.
        vocab = None if int(params.get("vocab_size", -1) or -1) > 0 else int(first["tok_embeddings.weight"].shape[0])
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

    def names(self):
        return list(self._meta_name)

    def _parts(self, name):
        meta_name, param = self._meta_name[name]
        axis = param.meta_split
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
