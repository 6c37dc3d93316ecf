"""The llama_jax parameter checkpoint: Orbax parameters + a metadata JSON + the tokenizer files.

    DST/
      llama_jax.json    {"format", "format_version", "param_layout", "dtype", "config", "source", "checksums"}
      params/           an Orbax checkpoint of the parameter tree (layout in model.py), zarr per leaf
      tokenizer.model, tokenizer.json, ...   copied from the source directory

Writing streams: Orbax first saves the tree with small placeholder leaves (one layer of each stacked leaf,
one row block of the embedding), which gives the exact files and tree metadata Orbax reads back; each leaf's
zarr array is then resized in place with tensorstore to its full shape and filled one layer / row block at a
time. Zarr keeps the placeholder's chunk shape, so a chunk is one layer, and Orbax restores it like any other
checkpoint — including straight into a different sharding, where each device reads only its own slice.

Reading checks what was read: "checksums" holds one per array (io/integrity.py; the writer adds them up block by
block), compared after a load and on an export's first read of each array; a chunk missing from disk is an
error, not zeros. A checkpoint written before checksums were recorded loads with a log line saying so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from llama_jax.config import ConfigError, LlamaConfig, dtype_of
from llama_jax.io import integrity, paths
from llama_jax.model import spec
from llama_jax.model.spec import PARAM_LAYOUT
from llama_jax.errors import CheckpointError, CorruptCheckpointError  # noqa: F401 (also re-exported)

log = logging.getLogger("llama_jax")

METADATA_FILE = "llama_jax.json"
PARAMS_DIR = "params"
FORMAT = "llama_jax.params"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------- metadata
def config_to_dict(config: LlamaConfig) -> dict:
    d = dataclasses.asdict(config)
    d["eos_token_id"] = list(config.eos_token_id)
    # How attention runs is the reader's machine's choice (a run trained with splash on a TPU reads back as
    # "auto", XLA on a CPU); leaving it out also keeps llama_jax.json as it was, readable by older versions.
    d.pop("attention", None)
    d.pop("decode_attention", None)
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
    return paths.isfile(paths.join(path, METADATA_FILE))


def write_metadata(directory: str, config: LlamaConfig, dtype: str, source: Optional[dict] = None,
                   checksums: Optional[Dict[str, int]] = None) -> None:
    """Write llama_jax.json; `checksums` ({"layers/attn/q": int}, io/integrity.py) are verified on every read."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "param_layout": PARAM_LAYOUT, "dtype": dtype,
            "config": config_to_dict(config), "source": source or {}}
    if checksums is not None:
        meta["checksums"] = {"algorithm": integrity.ALGORITHM, "arrays": dict(sorted(checksums.items()))}
    with paths.open(paths.join(directory, METADATA_FILE), "w") as f:
        f.write(json.dumps(meta, indent=2) + "\n")


def read_metadata(directory: str) -> Tuple[dict, LlamaConfig]:
    """(metadata dict, config) of a llama_jax checkpoint; refuses other formats and layouts by name."""
    path = paths.join(directory, METADATA_FILE)
    if not paths.isfile(path):
        raise CheckpointError(f"{directory}: not a llama_jax checkpoint (no {METADATA_FILE})")
    try:
        with paths.open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("param_layout") != PARAM_LAYOUT:
        raise CheckpointError(f"{path}: parameters are in layout {meta.get('param_layout')!r}, but this llama_jax "
                              f"reads {PARAM_LAYOUT!r}; convert the checkpoint again from its source")
    if not paths.isdir(paths.join(directory, PARAMS_DIR)):
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

        self.params_dir = paths.join(directory, PARAMS_DIR)  # local or gs:// (Orbax and tensorstore speak both)
        placeholders = {}
        for path, shape, axis, block in leaves:
            small = list(shape)
            if axis is not None:
                small[axis] = min(block, shape[axis])
            placeholders[path] = np.zeros(small, dtype)
        # Non-OCDBT: each leaf is its own zarr array, which tensorstore can resize and fill in place.
        with ocp.Checkpointer(ocp.StandardCheckpointHandler(use_ocdbt=False)) as ckptr:
            ckptr.save(self.params_dir, spec.nest(placeholders.items()))
        self._arrays, self._sums = {}, {}
        for path, shape, _, _ in leaves:
            arr = ts.open(leaf_spec(self.params_dir, ".".join(path)), open=True).result()
            if tuple(arr.shape) != tuple(shape):
                arr = arr.resize(exclusive_max=tuple(shape), expand_only=True).result()
            self._arrays[path], self._sums[path] = arr, 0

    def write(self, path: Tuple[str, ...], index: Tuple[slice, ...], block: np.ndarray) -> None:
        arr = self._arrays[path]
        block = np.asarray(block, arr.dtype.numpy_dtype)
        self._sums[path] = integrity.add(self._sums[path], integrity.block_checksum(block, arr.shape, index))
        arr[index].write(block).result()

    def checksums(self) -> Dict[str, int]:
        """{"layers/attn/q": checksum} of what was written (each block once), for `write_metadata`."""
        return {"/".join(path): value for path, value in self._sums.items()}


# ---------------------------------------------------------------------------------------------- reading
def _orbax_tree_metadata(params_dir: str) -> dict:
    path = paths.join(params_dir, "_METADATA")
    try:
        with paths.open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, paths.StorageError) as e:
        raise CheckpointError(f"{path}: cannot read Orbax tree metadata ({e})") from None


def leaf_spec(params_dir: str, name: str, fill_missing: bool = True) -> dict:
    """Tensorstore spec of one leaf of an Orbax parameter checkpoint (zarr or zarr3, OCDBT or not). Readers
    pass fill_missing=False: a chunk missing from disk is then an error, not the fill value (zeros)."""
    meta = _orbax_tree_metadata(params_dir) if paths.isfile(paths.join(params_dir, "_METADATA")) else {}
    driver = "zarr3" if meta.get("use_zarr3") else "zarr"
    if paths.isfile(paths.join(params_dir, "manifest.ocdbt")):
        kvstore = {"driver": "ocdbt", "base": paths.url(params_dir), "path": name}
    else:  # the file driver locally, the gcs driver for gs://
        kvstore = paths.kvstore(paths.join(params_dir, name))
    out = {"driver": driver, "kvstore": kvstore}
    if not fill_missing:
        out["fill_missing_data_reads"] = False
    return out


_STATUS = re.compile(r"\b(NOT_FOUND|DATA_LOSS|FAILED_PRECONDITION|OUT_OF_RANGE|INVALID_ARGUMENT|INTERNAL|UNKNOWN|"
                     r"PERMISSION_DENIED|UNAVAILABLE|RESOURCE_EXHAUSTED): ([^\n]*?)(?:'\)|\)\.?|$)", re.M)


def read_error(e: BaseException) -> str:
    """The one line that matters of a tensorstore / Orbax read error (its status line; they carry the whole
    tensorstore spec besides), e.g. 'NOT_FOUND: Error reading "lm_head/0.0" ...'."""
    seen = e
    while seen is not None:
        m = _STATUS.search(str(seen))
        if m:
            return f"{m.group(1)}: {m.group(2).strip()}"[:400]
        seen = seen.__cause__ or seen.__context__
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:400]


def verify(where: str, expected: Optional[dict], actual: Dict[str, int], what: str) -> None:
    """Raise CorruptCheckpointError naming the first array of `where` whose checksum differs from the one
    recorded (`expected`: the {"algorithm", "arrays"} record, None for a checkpoint written without one)."""
    if expected is None:
        log.warning(f"{where}: no checksums recorded (written by an older llama_jax): {what} without verifying "
                    "the stored arrays")
        return
    if expected.get("algorithm") != integrity.ALGORITHM:
        raise CheckpointError(f"{where}: checksums of kind {expected.get('algorithm')!r}, this llama_jax "
                              f"verifies {integrity.ALGORITHM!r}")
    bad = integrity.mismatches(expected.get("arrays", {}), actual)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CorruptCheckpointError(f"{where}: array {bad[0]}{more} does not match the checksum recorded when it "
                                     "was written: the stored data is corrupt")


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
    stored = meta.get("dtype") or config.param_dtype
    dtype = dtype or stored
    config = config.replace(param_dtype=dtype)
    params_dir = paths.join(directory, PARAMS_DIR)
    _check_tree(params_dir, config)
    shapes = spec.param_shapes(config)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype_of(dtype), sharding=sh),
                          shapes, shardings)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(paths.absolute(params_dir), target)
    except Exception as e:  # noqa: BLE001 - Orbax and tensorstore raise bare Exceptions with the whole spec
        raise CorruptCheckpointError(f"{params_dir}: cannot read the stored arrays: {read_error(e)}") from None
    if meta.get("checksums") is None:
        verify(params_dir, None, {}, "loaded")  # the log line of an unverified (older) checkpoint
    elif np.dtype(dtype_of(dtype)) == np.dtype(dtype_of(stored)):
        verify(params_dir, meta.get("checksums"), integrity.tree_checksums(params), "loaded")
    else:  # cast on read: the checksums are of the stored values, so check those (from disk, slab by slab)
        ParamsReader(directory).verify_all()
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
        self.params_dir = paths.join(directory, PARAMS_DIR)
        _check_tree(self.params_dir, self.config)
        self._ts, self._arrays = ts, {}
        self._checksums = self.meta.get("checksums")
        if self._checksums is None:
            verify(self.params_dir, None, {}, "read")  # the log line of an unverified (older) checkpoint

    def verify_all(self) -> None:
        """Read every leaf once and compare it with its checksum."""
        for p in spec.params(self.config):
            self.read(".".join(p.path), (slice(0, 0),) if p.full_shape(self.config) else ())

    def read(self, name: str, index=()) -> np.ndarray:
        """Block `index` of leaf `name` ("layers.attn.q"); the first read of a leaf verifies all of it."""
        if name not in self._arrays:
            self._arrays[name] = self._open(name)
        return self._read(name, index)

    def _open(self, name: str):
        try:
            arr = self._ts.open(leaf_spec(self.params_dir, name, fill_missing=False), open=True).result()
        except Exception as e:  # noqa: BLE001 - tensorstore's errors carry the whole spec
            raise CorruptCheckpointError(f"{self.params_dir}/{name}: cannot open: {read_error(e)}") from None
        self._arrays[name] = arr
        if self._checksums is not None:
            self._verify(name, arr)
        return arr

    def _read(self, name: str, index) -> np.ndarray:
        try:
            return np.asarray(self._arrays[name][index].read().result())
        except Exception as e:  # noqa: BLE001 - a lost chunk is NOT_FOUND, a damaged one a decoding error
            raise CorruptCheckpointError(f"{self.params_dir}/{name}: cannot read: {read_error(e)}") from None

    def _verify(self, name: str, arr) -> None:
        """Read leaf `name` slab by slab along its first axis (a layer, or rows of about 64 MiB) and compare its
        checksum with the one recorded."""
        shape = tuple(arr.shape)
        row = int(np.prod(shape[1:], dtype=np.int64)) * arr.dtype.numpy_dtype.itemsize
        step = max(1, (64 << 20) // max(row, 1)) if shape else 1
        total = 0
        for start in range(0, shape[0] if shape else 1, step):
            index = (slice(start, min(start + step, shape[0])),) if shape else ()
            total = integrity.add(total, integrity.block_checksum(self._read(name, index), shape, index))
        key = name.replace(".", "/")
        expected = dict(self._checksums, arrays={key: self._checksums.get("arrays", {}).get(key)})
        verify(self.params_dir, expected, {key: total}, "read")
