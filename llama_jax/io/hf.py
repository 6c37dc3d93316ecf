"""Hugging Face checkpoint directories: config.json + model.safetensors, or sharded safetensors files with
model.safetensors.index.json. Tensors are read lazily, one at a time (or a range of rows)."""

from __future__ import annotations

import glob
import json
import os
from typing import Dict

from llama_jax.config import LlamaConfig
from llama_jax.errors import ConversionError, SafetensorsError
from llama_jax.io.safetensors_io import SafetensorsFile
from llama_jax.io.source import Source


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


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
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ConversionError(f"{index_path}: not a safetensors index (expected a 'weight_map'; {e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ConversionError(f"{index_path}: weight_map is {weight_map!r:.60}; expected an object "
                                  "{tensor name: file name}")
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
