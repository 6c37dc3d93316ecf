"""The converter's and the sharded loader's unit of work: one block of one parameter array, read from a Source
in our layout. A block is one layer of a stacked array, or a range of rows of a large 2-D one (the embedding,
the output head), so no more than one tensor is ever in memory.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.io.source import Source
from llama_jax.model import spec

BLOCK_BYTES = 64 << 20  # large unstacked arrays are converted in row blocks of about this size


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One parameter array of our tree (`param`, its full `shape`), written in blocks of `block` entries along
    `block_axis` (None: whole)."""

    param: spec.Param
    shape: Tuple[int, ...]
    block_axis: Optional[int]
    block: int

    @property
    def path(self) -> Tuple[str, ...]:
        return self.param.path

    @property
    def name(self) -> str:
        """The leaf's name in an Orbax checkpoint (its path joined with dots)."""
        return ".".join(self.path)

    @property
    def stacked(self) -> bool:
        return self.param.stacked

    def blocks(self) -> List[Tuple[slice, ...]]:
        """Index tuples that tile the whole array, one block each."""
        if self.block_axis is None:
            return [tuple(slice(None) for _ in self.shape)]
        n, out = self.shape[self.block_axis], []
        for s in range(0, n, self.block):
            index = [slice(None)] * len(self.shape)
            index[self.block_axis] = slice(s, min(s + self.block, n))
            out.append(tuple(index))
        return out


def leaves(config: LlamaConfig, itemsize: int = 4) -> List[Leaf]:
    """Our parameter arrays in file order: stacked ones a layer at a time, large 2-D ones in row blocks of the
    checkpoint's rows (the spec's `hf_row_axis`), small ones whole."""
    out = []
    for p in spec.params(config):
        shape = p.full_shape(config)
        if p.stacked:
            axis, block = 0, 1
        elif len(shape) == 2:
            axis = p.hf_row_axis()
            row_bytes = shape[1 - axis] * itemsize
            block = max(1, BLOCK_BYTES // row_bytes)
        else:
            axis, block = None, 0
        out.append(Leaf(p, shape, axis, block))
    return out


def read_block(source: Source, leaf: Leaf, index: Tuple[slice, ...], dtype) -> np.ndarray:
    """leaf[index] in our layout and `dtype`, reading only the layers / rows that index covers."""
    config, p = source.config, leaf.param
    index = tuple(index) + (slice(None),) * (len(leaf.shape) - len(index))
    if leaf.stacked:
        layers = range(*index[0].indices(leaf.shape[0]))
        parts = [p.from_hf(source.read(p.hf_name(p.hf_layer(config, i))), config)[index[1:]].astype(dtype, copy=False)
                 for i in layers]  # our stacked layer i is checkpoint layer hf_layer(i) (Mllama interleaves)
        if len(parts) == 1:  # the converter's case: one layer, no extra copy
            return parts[0][None]
        return np.stack(parts) if parts else np.zeros((0,) + leaf.shape[1:], dtype)
    if leaf.block_axis is not None:  # checkpoint rows [s, e) are our block_axis [s, e)
        axis = leaf.block_axis
        s, e, _ = index[axis].indices(leaf.shape[axis])
        rows = source.read_rows(p.hf_name(), s, e)
        block = rows.T if p.inputs else rows  # a matmul weight's checkpoint rows are our columns
        rest = tuple(slice(None) if a == axis else ix for a, ix in enumerate(index))
        return block[rest].astype(dtype, copy=False)
    return p.from_hf(source.read(p.hf_name()), config)[index].astype(dtype, copy=False)


def hf_blocks(read, leaf: Leaf, layer: Optional[int], config: LlamaConfig):
    """The inverse: the checkpoint tensor of `leaf` (our stacked `layer` of it when stacked) as row blocks, from
    `read(leaf_name, index) -> our array`, one layer / row block at a time."""
    p = leaf.param
    if layer is not None:
        yield p.to_hf(read(leaf.name, (layer,)), config)
    elif leaf.block_axis is not None:
        for index in leaf.blocks():
            block = read(leaf.name, index)
            yield block.T if p.inputs else block
    else:
        yield p.to_hf(read(leaf.name, ()), config)
