"""`llama_jax.load(path)`: (config, params) from whatever checkpoint directory `path` is (see `io.formats`).

With a `mesh`, parameters come back as jax.Arrays placed per `sharding.param_shardings(config, mesh, rules)`,
and no host reads more than the slices its devices hold: Orbax restores into the target shardings, and
safetensors / .pth tensors are read by `jax.make_array_from_callback`, a layer at a time.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from llama_jax.config import LlamaConfig, dtype_of
from llama_jax.io import formats
from llama_jax.io.blocks import leaves, read_block
from llama_jax.io.source import Source
from llama_jax.model import spec
from llama_jax.parallel.sharding import DEFAULT_RULES


def load(path, dtype=None, mesh=None, rules=DEFAULT_RULES) -> Tuple[LlamaConfig, dict]:
    """(config, params) from a llama_jax checkpoint, a Hugging Face or Meta directory (or hf://org/name on the
    Hugging Face Hub), or a training workdir.

    `dtype` ('bfloat16', 'float32', ... or a numpy dtype) casts the parameters (default: as stored) and is
    recorded as `config.param_dtype`. With `mesh`, params are sharded jax.Arrays (see the module docstring);
    without, they live on the default device.
    """
    path = formats.resolve(path)  # hf://org/name: a local snapshot in the Hugging Face cache
    if dtype is not None:
        dtype = np.dtype(dtype).name
    fmt = formats.find(path)
    if fmt.load is not None:
        return fmt.load(path, dtype, mesh, rules)
    return load_source(formats.open_source(path), dtype, mesh, rules)


def load_source(source: Source, dtype: Optional[str], mesh, rules):
    """(config, params) read from a tensor Source, block by block (see the module docstring)."""
    import jax

    dtype = dtype or source.dtype_name()
    np_dtype = dtype_of(dtype)
    config = source.config.replace(param_dtype=dtype)
    plan = leaves(config, np_dtype.itemsize)
    flat = {}
    if mesh is None:
        device = jax.devices()[0]
        for leaf in plan:
            flat[leaf.path] = jax.device_put(read_block(source, leaf, (), np_dtype), device)
    else:
        from llama_jax.parallel.sharding import param_shardings

        shardings = param_shardings(config, mesh, rules)
        for leaf in plan:
            sharding = shardings
            for key in leaf.path:
                sharding = sharding[key]
            flat[leaf.path] = jax.make_array_from_callback(leaf.shape, sharding, _reader(source, leaf, np_dtype))
    return config, spec.nest(flat.items())


def _reader(source, leaf, np_dtype):
    """Callback for make_array_from_callback; remembers the last block so replicas of one slice read it once."""
    last = {}

    def read(index):
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in last:
            last.clear()
            last[key] = read_block(source, leaf, index, np_dtype)
        return last[key]

    return read
