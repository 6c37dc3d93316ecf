"""`llama_jax.load(path)`: (config, params) from whatever checkpoint directory `path` is.

Loading is a dispatch on what the directory holds: the first entry of `LOADERS` whose `detect(path)` is true
loads it. Add a kind of directory (say, a training workdir) with `register_loader(name, detect, load_fn)`;
`load_fn(path, dtype, mesh, rules) -> (config, params)` gets the same arguments as `load`.

With a `mesh`, parameters come back as jax.Arrays placed per `sharding.param_shardings(config, mesh, rules)`,
and no host reads more than the slices its devices hold: Orbax restores into the target shardings, and
safetensors / .pth tensors are read by `jax.make_array_from_callback`, a layer at a time.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, List, Optional, Tuple

import numpy as np

from llama_jax.io import checkpoint
from llama_jax.io import sources
from llama_jax.config import LlamaConfig
from llama_jax.parallel.sharding import DEFAULT_RULES

LoadFn = Callable[..., Tuple[LlamaConfig, dict]]


@dataclasses.dataclass(frozen=True)
class Loader:
    name: str
    detect: Callable[[str], bool]
    load: LoadFn


LOADERS: List[Loader] = []


def register_loader(name: str, detect: Callable[[str], bool], load_fn: LoadFn, first: bool = True) -> None:
    """Teach `load` a new kind of directory; `first` puts it ahead of the built-in kinds."""
    loader = Loader(name, detect, load_fn)
    LOADERS.insert(0, loader) if first else LOADERS.append(loader)


def load(path, dtype=None, mesh=None, rules=DEFAULT_RULES) -> Tuple[LlamaConfig, dict]:
    """(config, params) from a llama_jax checkpoint, a Hugging Face directory or a Meta directory.

    `dtype` ('bfloat16', 'float32', ... or a numpy dtype) casts the parameters (default: as stored) and is
    recorded as `config.param_dtype`. With `mesh`, params are sharded jax.Arrays (see the module docstring);
    without, they live on the default device.
    """
    path = os.fspath(path)
    if dtype is not None:
        dtype = np.dtype(dtype).name
    if not os.path.isdir(path):
        raise sources.ConversionError(f"{path}: no such directory")
    for loader in LOADERS:
        if loader.detect(path):
            return loader.load(path, dtype, mesh, rules)
    raise sources.ConversionError(
        f"{path}: not a checkpoint llama_jax knows; expected one of: "
        + "; ".join(f"{l.name}" for l in LOADERS))


def _load_checkpoint(path: str, dtype: Optional[str], mesh, rules):
    shardings = None
    if mesh is not None:
        from llama_jax.parallel.sharding import param_shardings

        _, config = checkpoint.read_metadata(path)
        shardings = param_shardings(config, mesh, rules)
    return checkpoint.restore_params(path, dtype, shardings)


def _load_source(path: str, dtype: Optional[str], mesh, rules):
    import jax

    source = sources.open_source(path)
    dtype = dtype or source.dtype_name()
    np_dtype = sources.dtype_of(dtype)
    config = source.config.replace(param_dtype=dtype)
    plan = sources.leaves(config, np_dtype.itemsize)
    flat = {}
    if mesh is None:
        device = jax.devices()[0]
        for leaf in plan:
            flat[leaf.path] = jax.device_put(sources.read_block(source, leaf, (), np_dtype), device)
    else:
        from llama_jax.parallel.sharding import param_shardings

        shardings = param_shardings(config, mesh, rules)
        for leaf in plan:
            sharding = shardings
            for key in leaf.path:
                sharding = sharding[key]
            flat[leaf.path] = jax.make_array_from_callback(leaf.shape, sharding, _reader(source, leaf, np_dtype))
    return config, checkpoint._nest(flat)


def _reader(source, leaf, np_dtype):
    """Callback for make_array_from_callback; remembers the last block so replicas of one slice read it once."""
    last = {}

    def read(index):
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in last:
            last.clear()
            last[key] = sources.read_block(source, leaf, index, np_dtype)
        return last[key]

    return read


register_loader("a llama_jax checkpoint (llama_jax.json + params/)", checkpoint.is_checkpoint, _load_checkpoint,
                first=False)
register_loader("a Hugging Face directory (config.json + model.safetensors or an index)", sources.is_hf_dir,
                _load_source, first=False)
register_loader("a Meta directory (params.json + consolidated.NN.pth)", sources.is_meta_dir, _load_source,
                first=False)


# A training workdir (train.py's WORKDIR): its final params are the llama_jax checkpoint in WORKDIR/export.
def _is_training_workdir(path: str) -> bool:
    return checkpoint.is_checkpoint(os.path.join(path, "export"))


def _load_training_workdir(path: str, dtype: Optional[str], mesh, rules):
    return _load_checkpoint(os.path.join(path, "export"), dtype, mesh, rules)


register_loader("a training workdir (WORKDIR/export written by train.py)", _is_training_workdir,
                _load_training_workdir, first=False)
