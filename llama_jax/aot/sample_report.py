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
from llama_jax.errors import AotError, ConfigError, DoesNotFit


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
    decode_attention: str = "xla"  # "paged": the Pallas decode kernel over the paged cache

    @property
    def fits(self) -> bool:
        return all(isinstance(c, Compiled) and c.total <= self.topology.hbm_bytes
                   for c in (self.prefill, self.decode))


def compile_sample(name: str, topology: str, *, batch: int = 1, context: int = 8192, prompt: int = 0,
                   int8: bool = False, tensor: int = -1, attention: str = "auto",
                   decode_attention: str = "auto") -> SampleReport:
    """Compile the sampler's two model calls (`llama_jax.sampling.program.prefill` and `decode_step`, the
    functions its decode loop runs): the prefill of a `prompt`-token batch into an empty `context`-slot KV
    cache, and one decode step, with bf16 (or int8) weights split over a (1, 1, tensor) mesh, the cache split
    over batch and KV heads (`program.kv_cache_sharding`), and the cache donated. `attention`: the prefill's
    (LlamaConfig.attention; "auto" is the splash kernel on a TPU for prompts of a multiple of 128 tokens).
    `decode_attention`: LlamaConfig.decode_attention ("auto" is the Pallas paged kernel on a TPU with a bf16
    cache, model/decode_kernel.py; its cache is the paged pool)."""
    from llama_jax.model import quantize
    from llama_jax.model.transformer import param_shapes
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
        config = config.replace(attention=attention, decode_attention=decode_attention)
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
    if config.vision is not None:  # VisionLlama decodes with XLA's attention, as the sampler runs it
        config = config.replace(decode_attention="xla")
    try:
        config = program.resolve_decode_attention(config, params, mesh)  # for this slice's platform: a TPU
    except ConfigError as e:
        raise AotError(f"--decode-attention {decode_attention}: {e}") from None
    cache_shape = jax.eval_shape(lambda: program.cache_initializer(config, params)(config, batch, context))
    cache_sharding = program.kv_cache_sharding(config, mesh, batch, context,
                                               paged=config.decode_attention == "paged")
    images = None
    if config.vision is not None:  # Llama 3.2 Vision: the prompt's image, and its keys/values in the cache
        images = image_inputs(config, mesh, batch, prompt, cache_shape, cache_sharding)
    cache = abstract(cache_shape, cache_sharding)
    rows = NamedSharding(mesh, logical_to_spec(("batch", "length"), (batch, 1), mesh))

    def prefill(params, tokens, lengths, cache, images=None):  # tokens [B, P] left-padded, lengths [B]
        mask = program.kv_mask(lengths, prompt, context)
        return program.prefill(config, params, tokens, lengths, cache, mask, images)

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
    programs = {"prefill": (prefill, (params, tokens, lengths, cache) + ((images,) if images else ())),
                "decode": (decode, (params, token, lengths, cache, step))}
    done = {}
    for key, (fn, args) in programs.items():
        try:
            done[key] = compile_and_analyze(key, InMesh(fn, (3,)), args, inputs, mesh)
        except DoesNotFit as e:  # report both programs either way
            done[key] = e
    pre, dec = done["prefill"], done["decode"]
    return SampleReport(name, topo, dict(mesh.shape), batch, prompt, context, int8, pre, dec,
                        config.decode_attention)


def image_inputs(config: LlamaConfig, mesh, batch: int, prompt: int, cache_shape: dict, cache_sharding: dict):
    """Llama 3.2 Vision's prefill inputs, abstract: one image of max_num_tiles tiles per row, as
    `sampling.vision.padded_image_inputs` gives the sampler's prefill (rows over the batch axes). Adds the
    cache's cross fields (one image's keys/values per cross layer, written by the prefill, read by every decode
    step) to `cache_shape` and `cache_sharding` in place."""
    from jax.sharding import NamedSharding

    from llama_jax.model.mllama import image_cache_shapes
    from llama_jax.model.transformer import CACHE_AXES
    from llama_jax.parallel.sharding import logical_to_spec

    dtype = cache_shape["k"].dtype
    for name, shape in image_cache_shapes(config, batch, 1).items():
        cache_shape[name] = jax.ShapeDtypeStruct(shape, jnp.bool_ if name == "cross_mask" else dtype)
        cache_sharding[name] = NamedSharding(mesh, logical_to_spec(CACHE_AXES[name], shape, mesh, where="KV cache"))
    v = config.vision
    tiles = v.max_num_tiles
    arrays = {"pixel_values": ((batch, 1, tiles, v.num_channels, v.image_size, v.image_size), jnp.float32),
              "aspect_ratio_ids": ((batch, 1), jnp.int32), "aspect_ratio_mask": ((batch, 1, tiles), jnp.int32),
              "cross_attention_mask": ((batch, prompt, 1, tiles), jnp.int32)}

    def rows(shape):
        axes = ("batch",) + (None,) * (len(shape) - 1)
        return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, where="image inputs"))

    return {k: jax.ShapeDtypeStruct(shape, dt, sharding=rows(shape)) for k, (shape, dt) in arrays.items()}
