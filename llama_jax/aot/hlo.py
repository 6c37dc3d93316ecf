"""Reading a compiled XLA program's text: which collectives run per step, over which mesh axes, how many bytes.

Used by `llama_jax.aot.analysis` on programs compiled for TPU topologies. The parser knows just enough of the HLO text
format: computations, instructions (`%name = shape op(operands), attrs`), the call graph with while-loop
trip counts (a scanned layer stack runs its body L times), and the three spellings of replica groups.

TPU specifics handled here: an async collective is split over several fusions that share one `channel_id`
(counted once), and a reduce-scatter appears as an `all-reduce` inside a computation named
`all-reduce-scatter*` (counted as a reduce-scatter of the all-reduce's input).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8,
          "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e\w+)\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_CALLS = re.compile(r"\b(calls|to_apply|body|condition)=%([\w.\-]+)")
_BRANCHES = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of the program: `kind` (all-gather, reduce-scatter, all-reduce, all-to-all,
    collective-permute), the mesh `axes` it runs over, `bytes` per device per execution (the gathered
    output / the reduce-scatter input / the all-reduce operand), `count` executions per step (loop trips),
    `shape` (HLO text of the result) and `op_name` (the jax source op, from the metadata)."""

    kind: str
    axes: Tuple[str, ...]
    bytes: int
    count: int
    shape: str
    op_name: str

    @property
    def step_bytes(self) -> int:
        return self.bytes * self.count


def array_shapes(shape_text: str) -> List[Tuple[str, Tuple[int, ...]]]:
    """All (dtype, dims) arrays in an HLO shape string (a tuple shape gives several)."""
    out = []
    for dtype, dims in _ARRAY.findall(shape_text):
        out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
    return out


def _nbytes(dtype: str, dims: Sequence[int]) -> int:
    return int(math.prod(dims) * _BYTES.get(dtype, 1))


def _computations(text: str) -> Tuple[Dict[str, List[str]], List[str], Optional[str]]:
    """{computation name: instruction lines}, names in text order, and the ENTRY name."""
    comps, order, entry, current = {}, [], None, None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = m.group(1)
                comps[current], order = [], order + [current]
                if line.startswith("ENTRY"):
                    entry = current
        elif line.strip() == "}":
            current = None
        else:
            comps[current].append(line)
    return comps, order, entry


def _multipliers(comps: Dict[str, List[str]], order: List[str], entry: Optional[str]) -> Dict[str, int]:
    """How many times each computation runs per execution of the program (while bodies x trip count).
    Callees are printed before their callers, so walking the text backwards visits every caller first."""
    mult = defaultdict(int)
    if entry is None:
        return {name: 1 for name in comps}
    mult[entry] = 1
    for name in reversed(order):
        if not mult[name]:
            continue
        for line in comps[name]:
            calls = dict((kind, callee) for kind, callee in _CALLS.findall(line))
            trip = _trip_count(line, comps.get(calls.get("condition"), [])) if "body" in calls else 1
            for kind, callee in calls.items():
                if kind == "to_apply":  # reduction bodies: scalar adds, not work of their own
                    continue
                mult[callee] += mult[name] * (trip if kind == "body" else 1)
            for group in _BRANCHES.findall(line):
                for callee in re.findall(r"%([\w.\-]+)", group):
                    mult[callee] += mult[name]
    return dict(mult)


def _trip_count(while_line: str, condition: List[str]) -> int:
    """Iterations of a while loop: XLA's known_trip_count when printed, else the loops jax emits for
    scan/fori (counter from 0, condition `counter < constant`)."""
    known = _TRIP.search(while_line)
    if known:
        return int(known.group(1))
    constants = dict(re.findall(r"%([\w.\-]+) = s32\[\]\S* constant\((\d+)\)", "\n".join(condition)))
    for line in condition:
        m = re.search(r"compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT", line)
        if m and m.group(1) in constants:
            return int(constants[m.group(1)])
    return 1


def _iota_groups(spec: str) -> Optional[np.ndarray]:
    """`[G,S]<=[d1,d2,...]T(p...)` -> [G, S] device ids."""
    m = re.match(r"\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", spec)
    if not m:
        return None
    dims = [int(d) for d in m.group(3).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(4):
        ids = ids.transpose([int(p) for p in m.group(4).split(",")])
    return ids.reshape(int(m.group(1)), int(m.group(2)))


def _mesh_groups(spec: str) -> Optional[np.ndarray]:
    """`mesh['axis_0'=2,'axis_1'=2] {'axis_1'}` -> [G, S] device ids (groups vary along the listed axes)."""
    m = re.match(r"mesh\[([^\]]*)\]\s*\{([^}]*)\}", spec)
    if not m:
        return None
    axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
    chosen = re.findall(r"'(\w+)'(:\S+)?", m.group(2))
    if any(sub for _, sub in chosen):  # sub-axis syntax: not needed by our meshes
        return None
    names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
    if any(c not in names for c, _ in chosen):
        return None
    ids = np.arange(math.prod(sizes)).reshape(sizes)
    group_axes = [names.index(c) for c, _ in chosen]
    rest = [i for i in range(len(names)) if i not in group_axes]
    ids = ids.transpose(rest + group_axes)
    return ids.reshape(-1, math.prod(sizes[i] for i in group_axes) if group_axes else 1)


def replica_groups(attrs: str, num_devices: int) -> Optional[np.ndarray]:
    """The [G, S] device-id groups of an instruction's `replica_groups=` (or `source_target_pairs=`), or
    None when the spelling is not understood."""
    m = re.search(r"replica_groups=(\{\{[\d,{} ]*\}\}|\{\}|\[[^ ]*|mesh\[[^\]]*\]\s*\{[^}]*\})", attrs)
    if m:
        spec = m.group(1)
        if spec == "{}":
            return np.arange(num_devices)[None, :]
        if spec.startswith("{{"):
            groups = [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([\d, ]*)\}", spec[1:-1])]
            size = {len(g) for g in groups}
            return np.array(groups) if len(size) == 1 else None
        return _iota_groups(spec) if spec.startswith("[") else _mesh_groups(spec)
    m = re.search(r"source_target_pairs=\{([\d,{} ]*)\}", attrs)
    if m:
        pairs = [[int(x) for x in p.split(",")] for p in re.findall(r"\{(\d+,\d+)\}", m.group(1))]
        return np.array(pairs) if pairs else None
    return None


def group_axes(groups: Optional[np.ndarray], mesh_shape: Dict[str, int]) -> Tuple[str, ...]:
    """Mesh axes along which the devices of a group differ. Device id i is the i-th device of the program's
    device assignment, which for a jit over a Mesh is the mesh's devices in row-major order."""
    if groups is None:
        return ("?",)
    names, sizes = list(mesh_shape), list(mesh_shape.values())
    if groups.max() >= math.prod(sizes):
        return ("?",)
    coords = np.stack(np.unravel_index(groups, sizes), axis=-1)  # [G, S, axes]
    varies = (coords != coords[:, :1, :]).any(axis=(0, 1))
    return tuple(n for n, v in zip(names, varies) if v)


def collectives(text: str, mesh_shape: Dict[str, int]) -> List[Collective]:
    """Every collective of a compiled program's text (`compiled.as_text()`), counted once per channel, with
    executions per step from the while-loop trip counts. `mesh_shape`: {axis name: size} of the mesh."""
    comps, order, entry = _computations(text)
    mult = _multipliers(comps, order, entry)
    num_devices = math.prod(mesh_shape.values())
    seen, out = set(), []
    for comp in order:
        for line in comps[comp]:
            m = _INSTR.match(line)
            if not m:
                continue
            name, shape, op, rest = m.groups()
            kind = op[:-len("-start")] if op.endswith("-start") else op
            if kind not in COLLECTIVES:
                continue
            if kind == "all-reduce" and comp.startswith("all-reduce-scatter"):
                kind = "reduce-scatter"
            channel = re.search(r"channel_id=(\d+)", rest)
            key = (kind, channel.group(1)) if channel else (comp, name)
            if key in seen:
                continue
            seen.add(key)
            arrays = array_shapes(shape)
            if op.endswith("-start") and kind in ("all-gather", "collective-permute"):
                arrays = [max(arrays, key=lambda a: math.prod(a[1]))]  # (operand, result, ...) -> result
            groups = replica_groups(rest, num_devices)
            nbytes = sum(_nbytes(d, s) for d, s in arrays)
            if op == "reduce-scatter" and groups is not None:
                nbytes *= groups.shape[1]  # the HLO op's result is the scattered piece
            op_name = re.search(r'op_name="([^"]*)"', rest)
            out.append(Collective(kind=kind, axes=group_axes(groups, mesh_shape), bytes=nbytes,
                                  count=max(mult.get(comp, 1), 1), shape=shape.split("{")[0] if "(" not in
                                  shape[:1] else shape[:120], op_name=op_name.group(1) if op_name else ""))
    return out


def while_loops(text: str) -> List[Tuple[int, int, str]]:
    """[(trip count, executions of the loop per program run, jax op name)] of every while loop: the layer
    scans and the gradient-accumulation scan, and loops XLA makes itself (e.g. windowed einsums that overlap
    a matmul with the collective-permutes of its operand). XLA's cost analysis counts each body once."""
    comps, order, entry = _computations(text)
    mult = _multipliers(comps, order, entry)
    out = []
    for name in order:
        for line in comps[name]:
            m = _INSTR.match(line)
            if not m or m.group(3) != "while":
                continue
            calls = dict(_CALLS.findall(line))
            op_name = re.search(r'op_name="([^"]*)"', line)
            out.append((_trip_count(line, comps.get(calls.get("condition"), [])), max(mult.get(name, 1), 1),
                        op_name.group(1) if op_name else ""))
    return out


def summarize(colls: Sequence[Collective]) -> List[Tuple[str, Tuple[str, ...], int, int]]:
    """[(kind, axes, executions per step, bytes per step per device)], largest first."""
    acc = defaultdict(lambda: [0, 0])
    for c in colls:
        acc[(c.kind, c.axes)][0] += c.count
        acc[(c.kind, c.axes)][1] += c.step_bytes
    rows = [(k, a, n, b) for (k, a), (n, b) in acc.items()]
    return sorted(rows, key=lambda r: -r[3])
