"""Meshes and the logical-axis rules table: the only file that names mesh axes.

Parameters and activations carry logical axis names ("embed", "heads", ...); `DEFAULT_RULES` maps them to
the mesh axes ("data", "fsdp", "tensor"). Changing parallelism means changing the mesh shape or the rules,
never the model.

    make_mesh(data, fsdp, tensor)      the mesh over any devices (default: all, of all processes); one size
                                       per axis of MESH_AXES, by position or name
    make_rules({...})                  the rules with overrides (e.g. from a run config)
    param_shardings / param_specs      where each parameter lives (param_specs also for a mesh you lack)
    param_bytes_per_device             planned parameter bytes per device; measured_bytes_per_device
                                       measures them on real arrays
    batch_sharding, replicated         shardings for input batches / activations and for scalars
    mesh_axes_of, split_axes, batch_shards   which mesh axes a logical axis splits over (for code that must
                                       not spell axis names: the trainer, aot), how many ways the batch splits
    init_sharded_params, use_mesh      parameters created in place; the context the model traces in
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.config import LlamaConfig
from llama_jax.errors import MeshError  # noqa: F401 (also re-exported)

# The mesh axes, outermost first: the last gets the nearest devices (its collectives run every layer).
MESH_AXES = ("data", "fsdp", "tensor")
# make_mesh's sizes when not given (every other axis: 1); -1 takes the devices the other axes leave.
DEFAULT_SIZES = {"fsdp": -1}

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
DEFAULT_RULES: Tuple[Tuple[str, object], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),      # the model dim as a matmul input (q/k/v, gate/up, the output head, the embedding)
    ("embed_out", "fsdp"),  # the model dim as a matmul output (o, down): may be split differently
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    # Llama 3.2 Vision's encoder: its matmuls use the axes above (vision width as embed/embed_out, its heads
    # and MLP over tensor). A patch pixel or patch position is a small axis read whole; the flattened
    # [tiles x patches x width] tile embeddings are large and cut over fsdp like the other weights.
    ("patch", None),
    ("tile_embed", "fsdp"),
)

# Logical axes that may be replicated instead of split when their size does not divide the mesh axis
# (Llama 3 has 8 KV heads; a tensor axis of 16 replicates them rather than failing).
REPLICATE_IF_INDIVISIBLE = ("kv_heads", "act_heads", "act_vocab", "batch", "cache_batch", "tile_embed")
# (parameter, logical axis) pairs replicated instead of refused when the size does not divide. The embedding's
# rows are a lookup table, not a split matmul: a vision model's vocab + 8 image rows (128264 = 8 x 16033) on a
# tensor axis of 16 are kept whole there (still split over fsdp along the model dim). Everything else that does
# not divide is refused with one line naming the parameter, e.g. the vision width 1280 on an fsdp axis of 512
# (sizes 2..256 that are powers of two divide it) or 16 vision heads on a tensor axis of 32.
REPLICATE_IF_INDIVISIBLE_IN = (("embed/embedding", "vocab"),)


def make_rules(overrides: Optional[Mapping[str, object]] = None, base=DEFAULT_RULES) -> Tuple[Tuple[str, object], ...]:
    """The rules table `base` with some logical axes re-mapped, e.g. from a run config:
    `make_rules({"embed": ("fsdp", "data"), "vocab": None})`. A value is a mesh axis name, a list/tuple of
    them, or None (replicated)."""
    table = dict(base)
    for logical, target in (overrides or {}).items():
        if logical not in table:
            import difflib
            close = difflib.get_close_matches(logical, table, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise MeshError(f"sharding rules: unknown logical axis {logical!r}{hint}; known: {sorted(table)}")
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise MeshError(f"sharding rules: {logical!r} -> {target!r} names unknown mesh axis {bad}; mesh axes "
                            f"are {MESH_AXES}")
        table[logical] = None if not axes else (axes[0] if len(axes) == 1 else axes)
    return tuple(table.items())


def make_mesh(*sizes: int, devices: Optional[Sequence] = None, **named: int) -> Mesh:
    """A mesh over `devices` (default: all devices of all processes) with one size per axis of MESH_AXES, given
    in that order or by name: `make_mesh(1, 8, 1)`, `make_mesh(data=2, fsdp=-1, tensor=4)`. Unnamed axes take
    DEFAULT_SIZES; one size may be -1 to take the devices the others leave. The devices are laid out on the
    physical torus where jax knows it (a TPU slice, also one described by libtpu without a TPU), the last
    axis innermost so its collectives stay on the nearest devices; elsewhere in the order given."""
    devices = list(jax.devices() if devices is None else devices)
    shape = _mesh_sizes(sizes, named)
    resolved = _resolve_sizes(shape, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(resolved, MESH_AXES, axis_types=auto, devices=devices)
    except Exception:  # a device set the physical-layout helper does not know: plain row-major order
        return Mesh(np.asarray(devices).reshape(resolved), MESH_AXES, axis_types=auto)


def _mesh_sizes(sizes: Sequence[int], named: Mapping[str, int]) -> Dict[str, int]:
    """{axis: size} for every axis of MESH_AXES from positional and named sizes, defaults for the rest."""
    if len(sizes) > len(MESH_AXES):
        raise MeshError(f"make_mesh{tuple(sizes)}: {len(sizes)} sizes for the {len(MESH_AXES)} mesh axes "
                        f"{MESH_AXES}")
    unknown = sorted(set(named) - set(MESH_AXES))
    if unknown:
        raise MeshError(f"make_mesh: unknown mesh axis {unknown}; mesh axes are {MESH_AXES}")
    twice = sorted(set(named) & set(MESH_AXES[:len(sizes)]))
    if twice:
        raise MeshError(f"make_mesh: {twice} given both by position and by name; mesh axes are {MESH_AXES}")
    out = {a: DEFAULT_SIZES.get(a, 1) for a in MESH_AXES}
    out.update(zip(MESH_AXES, sizes))
    out.update(named)
    return out


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _resolve_sizes(shape: Mapping[str, int], n: int) -> Tuple[int, ...]:
    """The mesh shape over `n` devices, the one -1 (if any) filled in; a MeshError that lists the valid
    sizes when `shape` does not cover the devices exactly."""
    sizes = [shape[a] for a in MESH_AXES]
    known = math.prod(s for s in sizes if s != -1)
    bad = (sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes) or n % known
           or (-1 not in sizes and known != n))
    if bad:
        fill, inner = next(a for a in MESH_AXES if DEFAULT_SIZES.get(a) == -1), MESH_AXES[-1]
        examples = ", ".join(
            "(" + ", ".join(f"{a}={t if a == inner else n // t if a == fill else 1}" for a in MESH_AXES) + ")"
            for t in _divisors(n) if t <= 16)
        raise MeshError(f"mesh {' × '.join(f'{a}={shape[a]}' for a in MESH_AXES)} does not divide the {n} "
                        f"devices: the product must be {n} (one size may be -1); valid sizes are the divisors "
                        f"of {n}: {_divisors(n)}, e.g. {examples}")
    return tuple(n // known if s == -1 else s for s in sizes)


def _axis_sizes(mesh) -> Mapping[str, int]:
    """{axis: size} of a Mesh (or of a plain mapping, to plan for a mesh of devices this host does not have)."""
    return mesh.shape if hasattr(mesh, "shape") else dict(mesh)


def _resolve(logical: Optional[str], dim: Optional[int], mesh, rules: dict, where: str):
    target = rules.get(logical) if logical is not None else None
    if target is None:
        return None
    sizes = _axis_sizes(mesh)
    axes = (target,) if isinstance(target, str) else tuple(target)
    axes = tuple(a for a in axes if sizes.get(a, 1) > 1)
    if not axes:
        return None
    size = math.prod(sizes[a] for a in axes)
    if dim is not None and dim % size:
        if logical in REPLICATE_IF_INDIVISIBLE or (where, logical) in REPLICATE_IF_INDIVISIBLE_IN:
            return None
        raise MeshError(f"{where}: dimension '{logical}' of size {dim} cannot be split over mesh axis "
                        f"{'×'.join(axes)} of size {size}; choose a mesh whose {'×'.join(axes)} size divides {dim}")
    return axes[0] if len(axes) == 1 else axes


def logical_to_spec(axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES,
                    where: str = "array") -> PartitionSpec:
    """PartitionSpec for an array with logical `axes` and `shape` on `mesh` under `rules`."""
    rules = dict(rules)
    return PartitionSpec(*(_resolve(a, d, mesh, rules, where) for a, d in zip(axes, shape)))


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy on every device (scalars, metrics, step counters)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES, axes: Sequence[Optional[str]] = ("batch",),
                   shape: Optional[Sequence[Optional[int]]] = None) -> NamedSharding:
    """NamedSharding for activations / input batches with logical `axes` (trailing dimensions replicated).
    The default splits only the leading batch dimension over data×fsdp, so one sharding fits every [B, ...]
    array of a batch dict (as a jit in_shardings prefix). `shape` entries of None skip the divisibility check."""
    shape = tuple(shape) if shape is not None else (None,) * len(axes)
    return NamedSharding(mesh, logical_to_spec(tuple(axes), shape, mesh, rules, "batch"))


def mesh_axes_of(logical: str, rules=DEFAULT_RULES) -> Tuple[str, ...]:
    """The mesh axes that the logical axis `logical` is split over under `rules` (() when replicated)."""
    target = dict(rules).get(logical)
    return () if target is None else ((target,) if isinstance(target, str) else tuple(target))


def batch_shards(mesh, rules=DEFAULT_RULES) -> int:
    """How many ways the batch is split on `mesh` (a Mesh or {axis: size}): the product of its batch axes."""
    return math.prod(_axis_sizes(mesh).get(a, 1) for a in mesh_axes_of("batch", rules))


def split_axes(logical: str, mesh, rules=DEFAULT_RULES) -> Tuple[str, ...]:
    """The mesh axes of size > 1 that `logical` is split over on `mesh` (a Mesh or {axis: size}); e.g.
    split_axes("heads", mesh) are the tensor-parallel axes, () when the mesh has none."""
    sizes = _axis_sizes(mesh)
    return tuple(a for a in mesh_axes_of(logical, rules) if sizes.get(a, 1) > 1)


def check_batch_size(batch_size: int, mesh: Mesh, rules=DEFAULT_RULES, what: str = "batch") -> None:
    """MeshError unless `batch_size` splits evenly over the mesh axes the batch is sharded on."""
    axes, size = mesh_axes_of("batch", rules), batch_shards(mesh, rules)
    if batch_size % size:
        raise MeshError(f"{what}: batch size {batch_size} is not a multiple of {'×'.join(axes)} = {size} devices "
                        f"(each device must get the same number of rows)")


def param_shardings(config: LlamaConfig, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
    """NamedSharding for every parameter of `config`'s model on `mesh`."""
    from llama_jax.model.transformer import logical_axes, param_shapes

    shapes, axes = param_shapes(config), logical_axes(config)

    def one(path, shape_struct, spec):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return NamedSharding(mesh, logical_to_spec(tuple(spec), shape_struct.shape, mesh, rules, name))

    return jax.tree_util.tree_map_with_path(one, shapes, axes)


def param_specs(config: LlamaConfig, mesh, rules=DEFAULT_RULES) -> dict:
    """PartitionSpec of every parameter; `mesh` may be a Mesh or just {axis: size} (to plan for a pod slice
    from a laptop). Raises MeshError naming the parameter, dimension and axis when a mesh cannot split it."""
    from llama_jax.model.transformer import logical_axes, param_shapes

    def one(path, shape_struct, spec):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return logical_to_spec(tuple(spec), shape_struct.shape, mesh, rules, name)

    return jax.tree_util.tree_map_with_path(one, param_shapes(config), logical_axes(config))


def param_bytes_per_device(config: LlamaConfig, mesh, rules=DEFAULT_RULES, dtype=None) -> int:
    """Bytes of parameters each device holds on `mesh` (a Mesh or {axis: size}), in `dtype` (default
    config.param_dtype): each leaf's bytes divided by the product of the mesh axes that split it."""
    from llama_jax.model.transformer import param_shapes

    sizes = _axis_sizes(mesh)
    itemsize = jnp.dtype(dtype or config.param_dtype).itemsize
    total = 0
    for shape, spec in zip(jax.tree.leaves(param_shapes(config)),
                           jax.tree.leaves(param_specs(config, mesh, rules),
                                           is_leaf=lambda x: isinstance(x, PartitionSpec))):
        split = 1
        for entry in spec:
            for axis in ((entry,) if isinstance(entry, str) else (entry or ())):
                split *= sizes[axis]
        total += math.prod(shape.shape) * itemsize // split
    return total


def measured_bytes_per_device(tree) -> Dict[object, int]:
    """Measured: {device: bytes of the tree's array shards stored on it} (this process's devices); the plan
    for an abstract tree is llama_jax.aot.analysis.abstract_bytes_per_device."""
    out: Dict[object, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=DEFAULT_RULES):
    """Context in which the model's logical activation constraints resolve against `mesh`, and its splash
    attention and paged decode attention run per shard (parallel/attention.py, parallel/decode_attention.py)."""
    from llama_jax.parallel.attention import splash_on  # it builds on this file
    from llama_jax.parallel.decode_attention import paged_on

    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)), splash_on(mesh, rules), paged_on(mesh, rules):
        yield


def init_sharded_params(config: LlamaConfig, mesh: Mesh, rng: jax.Array, rules=DEFAULT_RULES) -> dict:
    """Random parameters created directly in their shardings: no host ever holds the whole model."""
    from llama_jax.model.transformer import Llama

    shardings = param_shardings(config, mesh, rules)

    def init(key):
        if config.vision is not None:  # one image in the init call, so the encoder and projector exist
            from llama_jax.model.mllama import VisionLlama, init_inputs

            tokens, images = init_inputs(config)
            variables = VisionLlama(config).init(key, tokens, **images)
        else:
            variables = Llama(config).init(key, jnp.zeros((1, 8), jnp.int32))
        return nn.meta.unbox(variables["params"])

    if config.vision is not None:
        # Outside the rules context: Flax cannot turn the patch embedding's logical names ("patch" three times,
        # one per pixel axis of [C, p, p, Dv]) into an in-graph constraint; out_shardings place every leaf.
        return jax.jit(init, out_shardings=shardings)(rng)
    with use_mesh(mesh, rules):
        return jax.jit(init, out_shardings=shardings)(rng)
