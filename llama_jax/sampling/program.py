"""The compiled sampling program: prefill a left-padded prompt batch, then a decode loop compiled once
(`lax.while_loop`) over an explicit KV cache.

Legend: B batch, P padded prompt length, S cache length, V vocab, N output buffer length.

`prefill` and `decode_step` are the program's two model calls, pure functions: `_generate` runs them (one
prefill, then one decode step per loop iteration) and `llama_jax.aot` lowers the same two for a TPU slice.

Shapes are bucketed (batch, prompt and cache lengths to powers of two, then multiples of 512) so a new prompt
length or `max_new_tokens` reuses a compiled program; `max_new_tokens` itself and the strategy's values
(temperature, top-k, top-p) are traced, so changing them never recompiles either.
"""

from __future__ import annotations

import contextlib
import functools
from typing import List, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from llama_jax.config import LlamaConfig
from llama_jax.errors import SamplingError
from llama_jax.cpu.decode_layout import decoding_model, init_per_layer_cache, is_per_layer, per_layer_cache_axes
from llama_jax.model.decode_kernel import PAGED_CACHE_AXES, PagedLlama, init_paged_cache, uses_paged
from llama_jax.model.transformer import CACHE_AXES, init_cache
from llama_jax.parallel.sharding import logical_to_spec, use_mesh
from llama_jax.sampling.stream import OnToken, emit, sink
from llama_jax.sampling.vision import padded_image_inputs
from llama_jax.sampling.strategies import Greedy, Strategy, check_seed


def bucket(n: int, minimum: int = 8, step: int = 512) -> int:
    """Powers of two from `minimum` up to `step`, then multiples of `step`: few distinct compiled shapes
    without padding long prompts by up to 2x."""
    if n <= step:
        return max(minimum, 1 << max(0, int(n - 1).bit_length()))
    return -(-n // step) * step


# ---- the two model calls -------------------------------------------------------------------------------
def kv_mask(lengths: jax.Array, plen: int, cache_len: int) -> jax.Array:
    """lengths [B] of prompts left-padded to `plen` -> [B, S] bool: the padding slots are never attended."""
    return jnp.arange(cache_len)[None, :] >= (plen - lengths)[:, None]


def prefill(config: LlamaConfig, params, tokens: jax.Array, lengths: jax.Array, cache, mask: jax.Array,
            images: Optional[dict] = None):
    """tokens [B, P] left-padded, lengths [B], cache empty (the `init_cache` of `decoding_model`), mask [B, S]
    (`kv_mask`) -> (logits [B, 1, V] at every row's last prompt token, cache with slots 0..P-1 written).
    `params` stacked, or per layer (`cpu.decode_layout.unstack_layers`). With the paged decode kernel
    (`uses_paged`; cache: `init_paged_cache`) each row's prompt goes to slots 0..len-1 instead, and `mask` is
    not used. `images` (Llama 3.2 Vision: `vision.padded_image_inputs`) go to the model with the prompt; it
    writes their keys/values into the cache's cross fields."""
    batch, plen = tokens.shape
    if uses_paged(config):
        return _paged_prefill(config, params, tokens, lengths, cache)
    pad = plen - lengths  # [B]
    positions = jnp.maximum(jnp.arange(plen)[None, :] - pad[:, None], 0)  # [B, P]: index minus padding
    return _model(config, params).apply({"params": params}, tokens, positions=positions, cache=cache, cache_index=0,
                                        kv_mask=mask, logits_at=jnp.full((batch,), plen - 1), **(images or {}))


def decode_step(config: LlamaConfig, params, token: jax.Array, lengths: jax.Array, cache, step: jax.Array,
                mask: jax.Array, *, plen: int):
    """One new token per row: token [B] (drawn at `step` - 1, step >= 1), lengths [B] of the prompts padded to
    `plen`, mask [B, S] -> (logits [B, 1, V], cache with slot P + step - 1 written)."""
    # the token from step-1 goes into cache slot P+step-1 at position length+step-1
    if uses_paged(config):  # ragged rows: slot = position (model/decode_kernel.py); `mask` is not used
        slots = lengths + step - 1
        return PagedLlama(config).apply({"params": params}, token[:, None], positions=slots[:, None], cache=cache,
                                        cache_index=slots)
    return _model(config, params).apply({"params": params}, token[:, None], positions=(lengths + step - 1)[:, None],
                                        cache=cache, cache_index=plen + step - 1, kv_mask=mask)


def _model(config: LlamaConfig, params):
    """The module of the two calls: VisionLlama for Llama 3.2 Vision (it reads the image keys/values from the
    cache at decode steps), else Llama or the per-layer CPU layout (`decoding_model`)."""
    if config.vision is not None:
        from llama_jax.model.mllama import VisionLlama

        return VisionLlama(config)
    return decoding_model(config, params)[0]


def _paged_prefill(config: LlamaConfig, params, tokens, lengths, cache):
    """`prefill` into the paged cache: each left-padded row rotated to start at slot 0 (its padding after it)."""
    batch, plen = tokens.shape
    shift = (jnp.arange(plen)[None, :] + (plen - lengths)[:, None]) % plen  # [B, P]
    positions = jnp.broadcast_to(jnp.arange(plen, dtype=jnp.int32), (batch, plen))
    return PagedLlama(config).apply({"params": params}, jnp.take_along_axis(tokens, shift, axis=1),
                                    positions=positions, cache=cache, cache_index=0, logits_at=lengths - 1)


def cache_initializer(config: LlamaConfig, params):
    """(config, batch, cache length) -> the empty KV cache that `prefill` and `decode_step` take."""
    return init_paged_cache if uses_paged(config) else decoding_model(config, params)[1]


def resolve_decode_attention(config: LlamaConfig, params, mesh=None) -> LlamaConfig:
    """`config` with decode_attention "paged" or "xla", as `uses_paged` decides for the platform of `mesh` (or
    the default backend). Per-layer parameters (the CPU layout) decode with XLA."""
    with (use_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
        paged = uses_paged(config)
    if paged and is_per_layer(params):
        if config.decode_attention == "paged":
            raise SamplingError("generate: decode_attention='paged' needs stacked parameters; these are per layer "
                                "(cpu.decode_layout.unstack_layers; Sampler(per_layer=False) keeps them stacked)")
        paged = False
    return config.replace(decode_attention="paged" if paged else "xla")


# ---- the compiled program --------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("config", "cache_len", "buf_len", "stream", "cache_sharding"))
def _generate(params, tokens, lengths, alive, max_new, strategy, key, stop_ids, images=None, *, config: LlamaConfig,
              cache_len: int, buf_len: int, stream: bool, cache_sharding: Optional[tuple]):
    """tokens [B, P] left-padded, lengths [B], alive [B] (False for batch padding rows), max_new scalar,
    cache_sharding: ((name, NamedSharding), ...) of the cache arrays (a tuple: static arguments are hashed),
    stop_ids [n] -> (out [B, N] int32 with -1 after a row stopped, number of steps taken)."""
    batch, plen = tokens.shape
    mask = kv_mask(lengths, plen, cache_len)  # once: the loop body only reads it

    def constrain(cache):
        if cache_sharding is None:
            return cache
        shardings = dict(cache_sharding)
        return {n: jax.tree.map(lambda c, n=n: jax.lax.with_sharding_constraint(c, shardings[n]), cache[n])
                if n in shardings else cache[n] for n in cache}

    # per-layer parameters (cpu.decode_layout) get a per-layer cache: every buffer updated in place
    cache = constrain(cache_initializer(config, params)(config, batch, cache_len))
    if images is not None:  # Llama 3.2 Vision: room for the image keys/values, written once by the prefill
        from llama_jax.model.mllama import init_image_cache

        cache.update(init_image_cache(config, batch, images["pixel_values"].shape[1], cache["k"].dtype))
    logits, cache = prefill(config, params, tokens, lengths, cache, mask, images)  # [B, 1, V]
    key, sub = jax.random.split(key)
    first = strategy(sub, logits[:, 0])

    def record(step, token, done, out):
        out = out.at[:, step].set(jnp.where(done, -1, token))
        done = done | jnp.isin(token, stop_ids)
        if stream:  # one module-level function: a new one per call would recompile (see stream.py)
            jax.debug.callback(emit, step, token, done)
        return done, out

    done, out = record(0, first, ~alive, jnp.full((batch, buf_len), -1, jnp.int32))

    def cond(state):
        step, _, _, done, _, _ = state
        return (step < max_new) & ~jnp.all(done)

    def body(state):
        step, token, cache, done, out, key = state
        logits, cache = decode_step(config, params, token, lengths, cache, step, mask, plen=plen)
        key, sub = jax.random.split(key)
        token = strategy(sub, logits[:, 0])
        done, out = record(step, token, done, out)
        return step + 1, token, constrain(cache), done, out, key

    step, _, _, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), first, cache, done, out, key))
    return out, step


def kv_cache_sharding(config: LlamaConfig, mesh, batch: int, cache_len: int, per_layer: bool = False,
                      paged: bool = False) -> dict:
    """{"k", "v"}: NamedShardings of the KV cache (see `init_cache`) on `mesh`: KV heads over the tensor axis,
    rows over the batch axes (each replicated where it does not divide, e.g. 8 KV heads on a tensor axis of
    16). `per_layer`: the sharding of each layer's buffer of a per-layer cache (`init_per_layer_cache`);
    `paged`: of the paged decode cache (`init_paged_cache`)."""
    init = init_paged_cache if paged else init_per_layer_cache if per_layer else init_cache
    shapes = jax.eval_shape(lambda: init(config, batch, cache_len))
    axes = PAGED_CACHE_AXES if paged else per_layer_cache_axes(batch) if per_layer else CACHE_AXES
    return {name: NamedSharding(mesh, logical_to_spec(axes[name], jax.tree.leaves(shape)[0].shape, mesh,
                                                      where="KV cache"))
            for name, shape in shapes.items()}


# ---- the entry point -------------------------------------------------------------------------------------
def generate_ids(params, config: LlamaConfig, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                 strategy: Optional[Strategy] = None, seed: Union[int, jax.Array] = 0,
                 stop_ids: Sequence[int] = (), mesh=None,
                 on_token: Optional[OnToken] = None, images: Optional[dict] = None) -> List[List[int]]:
    """Generate up to `max_new_tokens` after each prompt (lists of token ids, BOS included) with `strategy`
    (default `Greedy()`).

    Returns the new tokens of each prompt, cut before its first stop token. `on_token(step, tokens [B],
    done [B])` is called from inside the compiled loop as each step's tokens are drawn (for streaming).
    With `mesh`, `params` should already be sharded (see `sharding.param_shardings`); the KV cache is split
    over the tensor axis (KV heads) and the batch axes. `images` (Llama 3.2 Vision): the prompts' image arrays
    (`sampling.vision.image_arrays`); the image encoder and the cross layers' keys/values run once, at prefill.
    """
    strategy = Greedy() if strategy is None else strategy
    _check(config, prompts, max_new_tokens)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    # never run past the context: every row's positions must stay < max_position_embeddings
    max_new = min(int(max_new_tokens), config.max_position_embeddings - max(len(p) for p in prompts))
    tokens, lens, alive = _pad_batch(prompts)
    cache_len, buf_len = bucket(tokens.shape[1] + max_new), bucket(max_new)
    key = seed if isinstance(seed, jax.Array) else jax.random.PRNGKey(check_seed(seed))  # one line, not an overflow
    stops = np.asarray(sorted(set(int(s) for s in stop_ids)) or [-2], np.int32)  # -2 never matches a token

    if config.vision is not None and config.decode_attention == "auto":  # the paged kernel is Llama's: VisionLlama
        config = config.replace(decode_attention="xla")                  # decodes with XLA ("paged" is refused)
    config = resolve_decode_attention(config, params, mesh)  # "auto" settled once, before the program is built
    cache_sharding = None if mesh is None else tuple(sorted(kv_cache_sharding(
        config, mesh, tokens.shape[0], cache_len, per_layer=is_per_layer(params),
        paged=config.decode_attention == "paged").items()))
    run = functools.partial(_generate, config=config, cache_len=cache_len, buf_len=buf_len,
                            stream=on_token is not None, cache_sharding=cache_sharding)
    args = (params, jnp.asarray(tokens), jnp.asarray(lens), jnp.asarray(alive), jnp.int32(max_new), strategy, key,
            jnp.asarray(stops))
    if images is not None:  # Llama 3.2 Vision: the image arrays of `sampling.vision.image_arrays`
        args += (padded_image_inputs(images, lens, tokens.shape[0], tokens.shape[1]),)
    with sink(on_token):
        with (use_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
            out, _ = run(*args)
        out = np.asarray(jax.device_get(out))
    return _cut(out[:len(prompts), :max_new], stop_ids)


def _check(config: LlamaConfig, prompts, max_new_tokens: int) -> None:
    if not prompts:
        raise SamplingError("generate: no prompts given")
    for i, prompt in enumerate(prompts):
        n = len(prompt)
        if n == 0:
            raise SamplingError(f"generate: prompt {i} is empty; give at least one token (e.g. the BOS)")
        if n >= config.max_position_embeddings:
            raise SamplingError(f"generate: prompt {i} has {n} tokens, which leaves no room in the model's "
                                f"context of {config.max_position_embeddings} tokens; shorten it")
        bad = [t for t in prompt if not 0 <= int(t) < config.embed_rows]  # a vision model's <|image|> too
        if bad:
            raise SamplingError(f"generate: prompt {i} has token ids {bad[:5]} outside the model's vocabulary "
                                f"[0, {config.embed_rows})")
    if max_new_tokens < 0:
        raise SamplingError(f"generate: max_new_tokens={max_new_tokens}; expected a non-negative number")


def _pad_batch(prompts):
    """-> tokens [B, P] left-padded (every prompt ends at P-1), lengths [B], alive [B]; B and P bucketed."""
    batch, plen = bucket(len(prompts), minimum=1), bucket(max(len(p) for p in prompts))
    tokens = np.zeros((batch, plen), np.int32)
    lens = np.ones((batch,), np.int32)  # padding rows: one token, never read
    for i, p in enumerate(prompts):
        tokens[i, plen - len(p):] = np.asarray(p, np.int32)
        lens[i] = len(p)
    return tokens, lens, np.arange(batch) < len(prompts)


def _cut(out: np.ndarray, stop_ids) -> List[List[int]]:
    """Rows of out [B, N] -> each row's tokens before its first stop token (or -1)."""
    stop_set = set(int(s) for s in stop_ids)
    results = []
    for row in out:
        ids = []
        for t in row:
            if t < 0 or int(t) in stop_set:
                break
            ids.append(int(t))
        results.append(ids)
    return results
