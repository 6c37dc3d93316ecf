"""The sampler's prefill and one decode step compiled for a TPU slice: `compile_sample` -> `SampleReport`."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict

import jax
import jax.numpy as jnp

from llama_jax.aot.analysis import Compiled, abstract, abstract_bytes_per_device, compile_and_analyze
from llama_jax.aot.topology import Topology, get_topology, topology_mesh
from llama_jax.config import LlamaConfig
from llama_jax.errors import AotError, DoesNotFit


@dataclasses.dataclass
class SampleReport:
    """Prefill of `prompt` tokens and one decode step, batch `batch`, KV cache of `context` slots."""

    model: str
    topology: Topology
    mesh_shape: Dict[str, int]
    batch: int
    prompt: int
    context: int
    int8: bool
    prefill: Any                # Compiled, or DoesNotFit when the TPU compiler refused it
    decode: Any

    @property
    def fits(self) -> bool:
        return all(isinstance(c, Compiled) and c.total <= self.topology.hbm_bytes
                   for c in (self.prefill, self.decode))


def compile_sample(name: str, topology: str, *, batch: int = 1, context: int = 8192, prompt: int = 0,
                   int8: bool = False, tensor: int = -1) -> SampleReport:
    """Compile the sampler's two model calls (`llama_jax.sampling.program.prefill` and `decode_step`, the
    functions its decode loop runs): the prefill of a `prompt`-token batch into an empty `context`-slot KV
    cache, and one decode step, with bf16 (or int8) weights split over a (1, 1, tensor) mesh, the cache split
    over batch and KV heads (`program.kv_cache_sharding`), and the cache donated."""
    from llama_jax.model import quantize
    from llama_jax.model.transformer import init_cache, param_shapes
    from llama_jax.parallel.sharding import MeshError, logical_to_spec, param_shardings, use_mesh
    from llama_jax.sampling import program
    from jax.sharding import NamedSharding

    topo = get_topology(topology)
    try:
        if os.path.isfile(os.path.join(name, "config.json")):  # a Hugging Face / llama_jax directory
            config = LlamaConfig.from_hf(os.path.join(name, "config.json"))
            config = config.replace(dtype="bfloat16", param_dtype="bfloat16")
        else:
            config = LlamaConfig.from_preset(name, dtype="bfloat16", param_dtype="bfloat16")
    except Exception as e:
        raise AotError(f"--checkpoint-config {name!r}: {e}") from None
    n = len(topo.devices)
    tensor = n if tensor == -1 else tensor
    mesh = topology_mesh(topo, tensor=tensor)
    prompt = prompt or context // 4
    try:
        shardings = param_shardings(config, mesh)
    except MeshError as e:
        raise AotError(f"{name} does not fit mesh {dict(mesh.shape)}: {e}") from None
    params = abstract(param_shapes(config), shardings)
    if int8:
        shapes = jax.eval_shape(lambda p: quantize.quantize_params(p), param_shapes(config))
        params = abstract(shapes, quantize.quantized_shardings(shardings))
    cache_shape = jax.eval_shape(lambda: init_cache(config, batch, context))
    cache_sharding = program.kv_cache_sharding(config, mesh, batch, context)
    cache = abstract(cache_shape, cache_sharding)
    rows = NamedSharding(mesh, logical_to_spec(("batch", "length"), (batch, 1), mesh))

    def prefill(params, tokens, lengths, cache):  # tokens [B, P] left-padded, lengths [B]
        mask = program.kv_mask(lengths, prompt, context)
        return program.prefill(config, params, tokens, lengths, cache, mask)

    def decode(params, token, lengths, cache, step):  # token [B], one new token per row
        mask = program.kv_mask(lengths, prompt, context)  # the sampler's loop computes it once, before
        return program.decode_step(config, params, token, lengths, cache, step, mask, plen=prompt)

    tokens = jax.ShapeDtypeStruct((batch, prompt), jnp.int32, sharding=rows)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=NamedSharding(mesh, jax.sharding.PartitionSpec(*rows.spec[:1])))
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, jax.sharding.PartitionSpec()))
    out = (NamedSharding(mesh, logical_to_spec(("batch", "length", "act_vocab"), (batch, 1, config.vocab_size),
                                               mesh)), cache_sharding)

    class InMesh:  # lower inside the mesh context, as sampling does (the model's logical constraints)
        def __init__(self, fn, donate):
            self.fn = jax.jit(fn, out_shardings=out, donate_argnums=donate)

        def lower(self, *args):
            with use_mesh(mesh):
                return self.fn.lower(*args)

    inputs = {"params": abstract_bytes_per_device(params), "kv_cache": abstract_bytes_per_device(cache)}
    token = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=lengths.sharding)
    programs = {"prefill": (prefill, (params, tokens, lengths, cache)),
                "decode": (decode, (params, token, lengths, cache, step))}
    done = {}
    for key, (fn, args) in programs.items():
        try:
            done[key] = compile_and_analyze(key, InMesh(fn, (3,)), args, inputs, mesh)
        except DoesNotFit as e:  # report both programs either way
            done[key] = e
    pre, dec = done["prefill"], done["decode"]
    return SampleReport(name, topo, dict(mesh.shape), batch, prompt, context, int8, pre, dec)
