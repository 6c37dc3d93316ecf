"""`llama_jax.load(path)`: (config, params) from whatever checkpoint directory `path` is (see `io.formats`).

With a `mesh`, parameters come back as jax.Arrays placed per `sharding.param_shardings(config, mesh, rules)`,
and no host reads more than the slices its devices hold: Orbax restores into the target shardings, and
safetensors / .pth tensors are read by `jax.make_array_from_callback`, a layer at a time.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np

from llama_jax.config import LlamaConfig, dtype_of
from llama_jax.errors import ConversionError
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
            flat[leaf.path] = jax.make_array_from_callback(
                leaf.shape, sharding, _reader(lambda index, leaf=leaf: read_block(source, leaf, index, np_dtype)))
    return config, spec.nest(flat.items())


def _reader(read_index):
    """Callback for make_array_from_callback; remembers the last block so replicas of one slice read it once."""
    last = {}

    def read(index):
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in last:
            last.clear()
            last[key] = read_index(index)
        return last[key]

    return read


def load_leaf_by_leaf(path, dtype=None, mesh=None, rules=DEFAULT_RULES
                      ) -> Tuple[LlamaConfig, Iterator[Tuple[Tuple[str, ...], object]]]:
    """(config, an iterator of (leaf path, array)): `load`'s parameters one at a time, each placed like `load`
    places it, for a caller that makes each smaller before the next is read (QLoRA's quantized base: the float
    model then never exists whole on the devices, which a 70B base on a v5e-8 needs). A llama_jax checkpoint (or
    a training workdir's export) is read through its block reader (checksums verified per leaf), any other
    format through its Source."""
    from llama_jax.io import checkpoint

    path = formats.resolve(path)
    if dtype is not None:
        dtype = np.dtype(dtype).name
    fmt = formats.find(path)
    if fmt.name in ("llama_jax", "workdir"):
        directory = path if fmt.name == "llama_jax" else formats.training_workdir_export(path)
        reader = checkpoint.ParamsReader(directory)
        stored = reader.meta.get("dtype") or reader.config.param_dtype
        config = reader.config.replace(param_dtype=dtype or stored)
        read = lambda leaf, index: reader.read(".".join(leaf.path), index)  # noqa: E731
    elif fmt.load is None:
        source = formats.open_source(path)
        config = source.config.replace(param_dtype=dtype or source.dtype_name())
        read = lambda leaf, index: read_block(source, leaf, index, dtype_of(config.param_dtype))  # noqa: E731
    else:
        raise ConversionError(f"{path}: {fmt.description} cannot be read one parameter at a time")
    return config, _placed_leaves(config, read, mesh, rules)


def _placed_leaves(config: LlamaConfig, read, mesh, rules):
    import jax

    np_dtype = dtype_of(config.param_dtype)
    shardings = None
    if mesh is not None:
        from llama_jax.parallel.sharding import param_shardings

        shardings = param_shardings(config, mesh, rules)
    for leaf in leaves(config, np_dtype.itemsize):
        if shardings is None:
            yield leaf.path, jax.device_put(np.asarray(read(leaf, ()), np_dtype), jax.devices()[0])
            continue
        sharding = shardings
        for key in leaf.path:
            sharding = sharding[key]
        yield leaf.path, jax.make_array_from_callback(
            leaf.shape, sharding, _reader(lambda index, leaf=leaf: np.asarray(read(leaf, index), np_dtype)))
