"""The llama_jax parameter checkpoint: Orbax parameters + a metadata JSON + the tokenizer files.

    DST/
      llama_jax.json    {"format", "format_version", "param_layout", "dtype", "config", "source"}
      params/           an Orbax checkpoint of the parameter tree (layout in model.py), zarr per leaf
      tokenizer.model, tokenizer.json, ...   copied from the source directory

Writing streams: Orbax first saves the tree with small placeholder leaves (one layer of each stacked leaf,
one row block of the embedding), which gives the exact files and tree metadata Orbax reads back; each leaf's
zarr array is then resized in place with tensorstore to its full shape and filled one layer / row block at a
time. Zarr keeps the placeholder's chunk shape, so a chunk is one layer, and Orbax restores it like any other
checkpoint — including straight into a different sharding, where each device reads only its own slice.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence, Tuple

import numpy as np

from llama_jax.config import ConfigError, LlamaConfig, dtype_of
from llama_jax.model import spec
from llama_jax.model.spec import PARAM_LAYOUT
from llama_jax.errors import CheckpointError  # noqa: F401 (also re-exported)

METADATA_FILE = "llama_jax.json"
PARAMS_DIR = "params"
FORMAT = "llama_jax.params"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------- metadata
def config_to_dict(config: LlamaConfig) -> dict:
    d = dataclasses.asdict(config)
    d["eos_token_id"] = list(config.eos_token_id)
    return d


def config_from_dict(d: dict, where: str = METADATA_FILE) -> LlamaConfig:
    known = {f.name for f in dataclasses.fields(LlamaConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise CheckpointError(f"{where}: config has unknown field(s) {unknown} (written by a newer llama_jax?)")
    try:
        return LlamaConfig(**d)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{where}: invalid config: {e}") from None


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, METADATA_FILE))


def write_metadata(directory: str, config: LlamaConfig, dtype: str, source: Optional[dict] = None) -> None:
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "param_layout": PARAM_LAYOUT, "dtype": dtype,
            "config": config_to_dict(config), "source": source or {}}
    with open(os.path.join(directory, METADATA_FILE), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


def read_metadata(directory: str) -> Tuple[dict, LlamaConfig]:
    """(metadata dict, config) of a llama_jax checkpoint; refuses other formats and layouts by name."""
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: not a llama_jax checkpoint (no {METADATA_FILE})")
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("param_layout") != PARAM_LAYOUT:
        raise CheckpointError(f"{path}: parameters are in layout {meta.get('param_layout')!r}, but this llama_jax "
                              f"reads {PARAM_LAYOUT!r}; convert the checkpoint again from its source")
    if not os.path.isdir(os.path.join(directory, PARAMS_DIR)):
        raise CheckpointError(f"{directory}: has {METADATA_FILE} but no {PARAMS_DIR}/ directory")
    return meta, config_from_dict(meta.get("config", {}), path)


# ---------------------------------------------------------------------------------------------- writing
class ParamsWriter:
    """Writes a parameter tree into `directory/params` block by block (see the module docstring).

    `leaves`: [(path tuple, full shape, block axis or None, block size)]. Use `write(path, index, block)`
    for blocks that tile each leaf; every leaf must be written completely before the checkpoint is used.
    """

    def __init__(self, directory: str, leaves: Sequence[Tuple[Tuple[str, ...], Tuple[int, ...], Optional[int], int]],
                 dtype: np.dtype):
        import orbax.checkpoint as ocp
        import tensorstore as ts

        self.params_dir = os.path.join(directory, PARAMS_DIR)
        placeholders = {}
        for path, shape, axis, block in leaves:
            small = list(shape)
            if axis is not None:
                small[axis] = min(block, shape[axis])
            placeholders[path] = np.zeros(small, dtype)
        # Non-OCDBT: each leaf is its own zarr array, which tensorstore can resize and fill in place.
        with ocp.Checkpointer(ocp.StandardCheckpointHandler(use_ocdbt=False)) as ckptr:
            ckptr.save(self.params_dir, spec.nest(placeholders.items()))
        self._arrays = {}
        for path, shape, _, _ in leaves:
            arr = ts.open(leaf_spec(self.params_dir, ".".join(path)), open=True).result()
            if tuple(arr.shape) != tuple(shape):
                arr = arr.resize(exclusive_max=tuple(shape), expand_only=True).result()
            self._arrays[path] = arr

    def write(self, path: Tuple[str, ...], index: Tuple[slice, ...], block: np.ndarray) -> None:
        self._arrays[path][index].write(block).result()


# ---------------------------------------------------------------------------------------------- reading
def _orbax_tree_metadata(params_dir: str) -> dict:
    path = os.path.join(params_dir, "_METADATA")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read Orbax tree metadata ({e})") from None


def leaf_spec(params_dir: str, name: str) -> dict:
    """Tensorstore spec of one leaf of an Orbax parameter checkpoint (zarr or zarr3, OCDBT or not)."""
    meta = _orbax_tree_metadata(params_dir) if os.path.isfile(os.path.join(params_dir, "_METADATA")) else {}
    driver = "zarr3" if meta.get("use_zarr3") else "zarr"
    if os.path.isfile(os.path.join(params_dir, "manifest.ocdbt")):
        kvstore = {"driver": "ocdbt", "base": f"file://{os.path.abspath(params_dir)}", "path": name}
    else:
        kvstore = {"driver": "file", "path": os.path.join(os.path.abspath(params_dir), name)}
    return {"driver": driver, "kvstore": kvstore}


def _check_tree(params_dir: str, config: LlamaConfig) -> None:
    stored = {tuple(k["key"] for k in v["key_metadata"])
              for v in _orbax_tree_metadata(params_dir).get("tree_metadata", {}).values()}
    expected = {p.path for p in spec.params(config)}
    if stored != expected:
        missing, extra = sorted(expected - stored), sorted(stored - expected)
        raise CheckpointError(f"{params_dir}: parameter tree does not match the config: missing "
                              f"{['/'.join(p) for p in missing]}, unexpected {['/'.join(p) for p in extra]}")


def restore_params(directory: str, dtype: Optional[str] = None, shardings=None) -> Tuple[LlamaConfig, dict]:
    """(config, params) from a llama_jax checkpoint. With `shardings` (a tree of NamedSharding, e.g. from
    `sharding.param_shardings`) Orbax reads each device's slice straight into place; otherwise the params land
    on the default device. `dtype` casts on read (default: the stored dtype)."""
    import jax
    import orbax.checkpoint as ocp

    meta, config = read_metadata(directory)
    dtype = dtype or meta.get("dtype") or config.param_dtype
    config = config.replace(param_dtype=dtype)
    params_dir = os.path.join(directory, PARAMS_DIR)
    _check_tree(params_dir, config)
    shapes = spec.param_shapes(config)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype_of(dtype), sharding=sh),
                          shapes, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.abspath(params_dir), target)
    return config, params


def load(directory: str, dtype: Optional[str] = None, mesh=None, rules=None) -> Tuple[LlamaConfig, dict]:
    """`restore_params` with the shardings of `mesh` under `rules` (llama_jax.load's entry for this format)."""
    shardings = None
    if mesh is not None:
        from llama_jax.parallel.sharding import DEFAULT_RULES, param_shardings

        _, config = read_metadata(directory)
        shardings = param_shardings(config, mesh, rules or DEFAULT_RULES)
    return restore_params(directory, dtype, shardings)


class ParamsReader:
    """Reads blocks of single leaves of a llama_jax checkpoint without restoring the whole tree (for export)."""

    def __init__(self, directory: str):
        import tensorstore as ts

        self.meta, self.config = read_metadata(directory)
        self.params_dir = os.path.join(directory, PARAMS_DIR)
        _check_tree(self.params_dir, self.config)
        self._ts, self._arrays = ts, {}

    def read(self, name: str, index=()) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = self._ts.open(leaf_spec(self.params_dir, name), open=True).result()
        return np.asarray(self._arrays[name][index].read().result())
