"""Sampling: prefill a left-padded prompt batch, then a decode loop compiled once (`lax.while_loop`) over an
explicit KV cache.

Legend: B batch, P padded prompt length, S cache length, V vocab, N output buffer length.

Shapes are bucketed (batch, prompt and cache lengths to powers of two, then multiples of 512) so a new prompt
length or `max_new_tokens` reuses a compiled program; `max_new_tokens` itself and the sampling values
(temperature, top-k, top-p) are traced, so changing them never recompiles either. Strategies are small frozen
dataclasses registered as pytrees: `Greedy()`, or `Sample((Temperature(0.8), TopK(40), TopP(0.95)))` — any
chain of filters on the logits followed by a draw from the softmax.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import types
from typing import Callable, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from llama_jax.config import LlamaConfig
from llama_jax.model.transformer import Llama, cache_axes, init_cache, unstack_layers
from llama_jax.parallel.sharding import logical_to_spec, use_mesh

NEG_INF = -1e30  # a finite "minus infinity": keeps softmax free of NaNs even when a row is all masked


# ---- strategies ----------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Greedy:
    """The most likely token."""

    def __call__(self, key: jax.Array, logits: jax.Array) -> jax.Array:  # [B, V] -> [B]
        del key
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Temperature:
    """Divide the logits by `value` (> 0): below 1 sharpens, above 1 flattens."""

    value: float

    def __call__(self, logits):
        return logits / jnp.asarray(self.value, logits.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TopK:
    """Keep the `k` largest logits (ties at the k-th value are kept too). `k` is traced, not static, so a new
    k never recompiles: the threshold is read from a sorted copy instead of lax.top_k's static shape."""

    k: int

    def __call__(self, logits):
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]  # [B, V] descending
        k = jnp.clip(jnp.asarray(self.k, jnp.int32), 1, logits.shape[-1])
        kth = jax.lax.dynamic_slice_in_dim(ordered, k - 1, 1, axis=-1)  # [B, 1]
        return jnp.where(logits < kth, NEG_INF, logits)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TopP:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches `p` (the top token is
    always kept)."""

    p: float

    def __call__(self, logits):
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]  # [B, V] descending
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        # p >= 1 keeps all (cumsum rounding must not drop the tail when the filter is "off")
        keep = (before < jnp.asarray(self.p, probs.dtype)) | (jnp.asarray(self.p) >= 1.0)
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
        return jnp.where(logits < threshold, NEG_INF, logits)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sample:
    """Apply `filters` in order to the float32 logits, then draw from the softmax."""

    filters: Tuple = ()

    def __call__(self, key: jax.Array, logits: jax.Array) -> jax.Array:  # [B, V] -> [B]
        logits = logits.astype(jnp.float32)
        for f in self.filters:
            logits = f(logits)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


Strategy = Union[Greedy, Sample]


def make_strategy(temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None) -> Strategy:
    """The strategy for the usual knobs: temperature 0 is greedy; top_k / top_p None (or 0 / 1.0) are off.

    Every sampled setting has the same structure, Sample((Temperature, TopK, TopP)) with "off" as k = V-ish
    and p = 1, so switching knobs in a notebook reuses one compiled program."""
    if temperature is None or temperature < 0:
        raise ValueError(f"temperature={temperature}: expected 0 (greedy) or a positive number")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k={top_k}: expected a positive number of tokens (or 0/None for off)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: expected a probability in (0, 1] (or None for off)")
    if temperature == 0:
        return Greedy()
    k = int(top_k) if top_k else _NO_TOP_K
    p = float(top_p) if top_p is not None else 1.0
    return Sample((Temperature(float(temperature)), TopK(k), TopP(p)))


_NO_TOP_K = 2 ** 30  # clipped to the vocabulary size: keeps every token


# ---- buckets -------------------------------------------------------------------------------------------
def bucket(n: int, minimum: int = 8, step: int = 512) -> int:
    """Powers of two from `minimum` up to `step`, then multiples of `step`: few distinct compiled shapes
    without padding long prompts by up to 2x."""
    if n <= step:
        return max(minimum, 1 << max(0, int(n - 1).bit_length()))
    return -(-n // step) * step


# ---- streaming -----------------------------------------------------------------------------------------
# The compiled loop calls this one module-level function (a new Python function per call would change the
# traced program and recompile); it forwards to the sink of the call in progress. The runtime calls it from
# its own threads, so the sink is process-wide and calls that stream are serialised by a lock.
_sink = types.SimpleNamespace(fn=None)
_stream_lock = threading.Lock()


def _emit(step, tokens, done):
    fn = _sink.fn
    if fn is not None:
        fn(int(step), np.asarray(tokens), np.asarray(done))


# ---- the compiled program --------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("config", "cache_len", "buf_len", "stream", "cache_sharding"))
def _generate(params, tokens, lengths, alive, max_new, strategy, key, stop_ids, *, config: LlamaConfig,
              cache_len: int, buf_len: int, stream: bool, cache_sharding: Optional[tuple]):
    """tokens [B, P] left-padded, lengths [B], alive [B] (False for batch padding rows), max_new scalar,
    cache_sharding: ((name, NamedSharding), ...) of the cache arrays (a tuple: static arguments are hashed),
    stop_ids [n] -> (out [B, N] int32 with -1 after a row stopped, number of steps taken)."""
    batch, plen = tokens.shape
    model = Llama(config)
    pad = plen - lengths  # [B]
    positions = jnp.maximum(jnp.arange(plen)[None, :] - pad[:, None], 0)  # [B, P]: index minus padding
    kv_mask = jnp.arange(cache_len)[None, :] >= pad[:, None]  # [B, S]: padding slots are never attended

    def constrain(cache):
        if cache_sharding is None:
            return cache
        shardings = dict(cache_sharding)
        return {n: jax.tree.map(lambda c, n=n: jax.lax.with_sharding_constraint(c, shardings[n]), cache[n])
                for n in cache}

    # per-layer parameters (model.unstack_layers) get a per-layer cache: every buffer updated in place
    cache = constrain(init_cache(config, batch, cache_len, per_layer="layers" not in params))
    logits, cache = model.apply({"params": params}, tokens, positions=positions, cache=cache, cache_index=0,
                                kv_mask=kv_mask, logits_at=jnp.full((batch,), plen - 1))  # [B, 1, V]
    key, sub = jax.random.split(key)
    first = strategy(sub, logits[:, 0])

    def record(step, token, done, out):
        out = out.at[:, step].set(jnp.where(done, -1, token))
        done = done | jnp.isin(token, stop_ids)
        if stream:
            jax.debug.callback(_emit, step, token, done)
        return done, out

    done, out = record(0, first, ~alive, jnp.full((batch, buf_len), -1, jnp.int32))

    def cond(state):
        step, _, _, done, _, _ = state
        return (step < max_new) & ~jnp.all(done)

    def body(state):
        step, token, cache, done, out, key = state
        # the token from step-1 goes into cache slot P+step-1 at position length+step-1
        logits, cache = model.apply({"params": params}, token[:, None], positions=(lengths + step - 1)[:, None],
                                    cache=cache, cache_index=plen + step - 1, kv_mask=kv_mask)
        key, sub = jax.random.split(key)
        token = strategy(sub, logits[:, 0])
        done, out = record(step, token, done, out)
        return step + 1, token, constrain(cache), done, out, key

    step, _, _, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), first, cache, done, out, key))
    return out, step


def kv_cache_sharding(config: LlamaConfig, mesh, batch: int, cache_len: int, per_layer: bool = False) -> dict:
    """{"k", "v"}: NamedShardings of the KV cache (see `init_cache`) on `mesh`: KV heads over the tensor axis,
    rows over the batch axes (each replicated where it does not divide, e.g. 8 KV heads on a tensor axis of
    16). `per_layer`: the sharding of each layer's buffer of a per-layer cache."""
    shapes = jax.eval_shape(lambda: init_cache(config, batch, cache_len, per_layer=per_layer))
    axes = cache_axes(batch, per_layer)
    return {name: NamedSharding(mesh, logical_to_spec(axes[name], jax.tree.leaves(shape)[0].shape, mesh,
                                                      where="KV cache"))
            for name, shape in shapes.items()}


def generate_ids(params, config: LlamaConfig, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                 strategy: Optional[Strategy] = None, seed: Union[int, jax.Array] = 0,
                 stop_ids: Sequence[int] = (), mesh=None,
                 on_token: Optional[Callable[[int, np.ndarray, np.ndarray], None]] = None) -> List[List[int]]:
    """Generate up to `max_new_tokens` after each prompt (lists of token ids, BOS included).

    Returns the new tokens of each prompt, cut before its first stop token. `on_token(step, tokens [B],
    done [B])` is called from inside the compiled loop as each step's tokens are drawn (for streaming).
    With `mesh`, `params` should already be sharded (see `sharding.param_shardings`); the KV cache is split
    over the tensor axis (KV heads) and the batch axes.
    """
    strategy = Greedy() if strategy is None else strategy
    lengths = [len(p) for p in prompts]
    if not prompts:
        raise ValueError("generate: no prompts given")
    for i, n in enumerate(lengths):
        if n == 0:
            raise ValueError(f"generate: prompt {i} is empty; give at least one token (e.g. the BOS)")
        if n >= config.max_position_embeddings:
            raise ValueError(f"generate: prompt {i} has {n} tokens, which leaves no room in the model's context "
                             f"of {config.max_position_embeddings} tokens; shorten it")
        bad = [t for t in prompts[i] if not 0 <= int(t) < config.vocab_size]
        if bad:
            raise ValueError(f"generate: prompt {i} has token ids {bad[:5]} outside the model's vocabulary "
                             f"[0, {config.vocab_size})")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens}; expected a non-negative number")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    # never run past the context: every row's positions must stay < max_position_embeddings
    max_new = min(int(max_new_tokens), config.max_position_embeddings - max(lengths))

    batch = bucket(len(prompts), minimum=1)
    plen = bucket(max(lengths))
    cache_len = bucket(plen + max_new)
    buf_len = bucket(max_new)
    tokens = np.zeros((batch, plen), np.int32)
    lens = np.ones((batch,), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, plen - len(p):] = np.asarray(p, np.int32)  # left padding: every prompt ends at P-1
        lens[i] = len(p)
    alive = np.arange(batch) < len(prompts)
    key = jax.random.PRNGKey(seed) if isinstance(seed, int) else seed
    stops = np.asarray(sorted(set(int(s) for s in stop_ids)) or [-2], np.int32)  # -2 never matches a token

    cache_sharding = None if mesh is None else tuple(sorted(kv_cache_sharding(
        config, mesh, batch, cache_len, per_layer="layers" not in params).items()))

    run = functools.partial(_generate, config=config, cache_len=cache_len, buf_len=buf_len,
                            stream=on_token is not None, cache_sharding=cache_sharding)
    args = (params, jnp.asarray(tokens), jnp.asarray(lens), jnp.asarray(alive), jnp.int32(max_new), strategy, key,
            jnp.asarray(stops))
    with (_stream_lock if on_token is not None else contextlib.nullcontext()):
        _sink.fn = on_token
        try:
            with (use_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
                out, _ = run(*args)
            out = np.asarray(jax.device_get(out))
        finally:
            _sink.fn = None
    stop_set = set(int(s) for s in stop_ids)
    results = []
    for row in out[:len(prompts)]:
        ids = []
        for t in row[:max_new]:
            if t < 0 or int(t) in stop_set:
                break
            ids.append(int(t))
        results.append(ids)
    return results


# ---- the notebook / CLI API ------------------------------------------------------------------------------
def decode_continuation(tokenizer, prefix: Sequence[int], new_ids: Sequence[int]) -> str:
    """The text of `new_ids` as it reads after `prefix`. SentencePiece drops a leading space when a piece
    starts the decoded text ("▁file" alone decodes to "file"), so decode prefix + new and remove the prefix."""
    if not prefix:
        return tokenizer.decode(list(new_ids))
    head = tokenizer.decode(list(prefix))
    text = tokenizer.decode(list(prefix) + list(new_ids))
    return text[len(head):] if text.startswith(head) else tokenizer.decode(list(new_ids))


class TextStream:
    """Turns streamed token ids of one row into text pieces for `write` (decoding the whole row each time so
    SentencePiece spaces and multi-byte characters come out right; a trailing partial character waits)."""

    def __init__(self, tokenizer, write: Callable[[str], None], stop_ids: Sequence[int],
                 prefix: Sequence[int] = ()):
        self.tokenizer, self.write, self.stop_ids = tokenizer, write, set(stop_ids)
        self.prefix = list(prefix)  # context tokens decoded with the row, so its first space survives
        self.ids: List[int] = []
        self.pending: dict = {}
        self.next_step, self.printed, self.finished = 0, "", False

    def __call__(self, step: int, tokens: np.ndarray, done: np.ndarray) -> None:
        self.pending[step] = int(tokens[0])
        while self.next_step in self.pending:  # callbacks may arrive out of order: emit in step order
            token = self.pending.pop(self.next_step)
            self.next_step += 1
            if self.finished or token in self.stop_ids:
                self.finished = True
                continue
            self.ids.append(token)
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        text = decode_continuation(self.tokenizer, self.prefix, self.ids)
        if not final and text.endswith("\ufffd"):
            return
        if text.startswith(self.printed):
            self.write(text[len(self.printed):])
        self.printed = text

    def close(self) -> None:
        self._flush(final=True)


def _on_cpu(params) -> bool:
    leaf = jax.tree.leaves(params)[0]
    return all(d.platform == "cpu" for d in getattr(leaf, "devices", lambda: jax.devices()[:1])())


def _fits_twice(params) -> bool:
    """Whether the free memory holds another copy of `params` (unstacking copies every layer once)."""
    import os

    size = sum(x.nbytes for x in jax.tree.leaves(params))
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: assume it fits
        return True
    return size < free


class Sampler:
    """Load once, generate many times.

        sampler = Sampler.load("runs/default")            # or a Hugging Face / Meta directory
        sampler.generate(["Once upon a time"], max_new_tokens=64)
        sampler.chat([{"role": "user", "content": "Hi!"}])

    `Sampler(config, params, tokenizer, mesh=None)` wraps parameters you already have.

    `per_layer` (default: on a CPU without a mesh, when a second copy of the weights fits in free memory) keeps
    one buffer per layer (`model.unstack_layers`, with q/k/v and gate/up joined) and a per-layer KV cache. On a
    CPU the scanned model copies every layer's weights out of the stacked arrays at every decode step;
    per-layer buffers are read in place (see BENCHMARKS.md for the figures). Off elsewhere: TPU compilers read
    the slices in place, and the scanned program compiles in the same time whatever the depth.
    """

    def __init__(self, config: LlamaConfig, params, tokenizer, mesh=None, per_layer: Optional[bool] = None):
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(f"tokenizer {getattr(tokenizer, 'path', tokenizer)!r} has {tokenizer.vocab_size} tokens "
                             f"but the model's vocabulary has only {config.vocab_size}: they do not belong together")
        if mesh is not None:  # place (or keep) the weights in their shardings; a no-op when already there
            from llama_jax.model.quantize import QArray, quantized_shardings
            from llama_jax.parallel.sharding import param_shardings

            shardings = param_shardings(config, mesh)
            if any(isinstance(x, QArray) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray))):
                shardings = quantized_shardings(shardings)
            params = jax.device_put(params, shardings)
        if per_layer is None:
            per_layer = mesh is None and _on_cpu(params) and _fits_twice(params)
        if per_layer and "layers" in params:
            params = unstack_layers(params, fuse=True)
        self.config, self.params, self.tokenizer, self.mesh = config, params, tokenizer, mesh
        self.stop_ids = tuple(sorted(set(tokenizer.stop_ids) | set(config.eos_token_id)))

    @classmethod
    def load(cls, path, mesh=None, int8: bool = False, dtype: Optional[str] = None,
             per_layer: Optional[bool] = None) -> "Sampler":
        """A llama_jax checkpoint, Hugging Face or Meta directory (with its tokenizer files). With `mesh` the
        weights are loaded sharded over it; `int8` stores the matmul weights as int8 (about half of bf16);
        `per_layer`: see the class."""
        import os

        import llama_jax
        from llama_jax.text.tokenizer import load_tokenizer

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ValueError(f"Sampler.load: {path!r} is not a directory (expected a llama_jax checkpoint, or a "
                             "Hugging Face or Meta model directory)")
        # a training workdir keeps its tokenizer at the top and its weights in export/; accept either place
        tok_dir = path
        if not any(os.path.exists(os.path.join(path, n)) for n in ("tokenizer.model", "tokenizer.json")):
            if os.path.isdir(os.path.join(path, "export")):
                tok_dir = os.path.join(path, "export")
        tokenizer = load_tokenizer(tok_dir)
        config, params = llama_jax.load(path, dtype=dtype, mesh=mesh)
        if dtype is not None:  # compute in the requested dtype too (logits and softmax stay float32)
            config = config.replace(dtype=jnp.dtype(dtype).name)
        if int8:
            from llama_jax.model.quantize import quantize_params
            from llama_jax.parallel.sharding import param_shardings

            params = quantize_params(params, param_shardings(config, mesh) if mesh is not None else None)
        return cls(config, params, tokenizer, mesh=mesh, per_layer=per_layer)

    def encode(self, prompt: str) -> List[int]:
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompt {prompt!r} is empty or not a string; give some text to continue")
        return self.tokenizer.encode(prompt, bos=True)

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 64, temperature: float = 0.8,
                     top_k: Optional[int] = None, top_p: Optional[float] = 0.95, seed: int = 0,
                     stream: Optional[Callable[[str], None]] = None,
                     stream_prefix: Sequence[int] = ()) -> List[List[int]]:
        """Token-id prompts -> the new token ids of each (stop token excluded). `stream(text)` receives the
        text as it is generated (one prompt only), decoded as it reads after `stream_prefix`."""
        strategy = make_strategy(temperature, top_k, top_p)
        on_token = None
        if stream is not None:
            if len(prompt_ids) != 1:
                raise ValueError(f"streaming works with one prompt; got {len(prompt_ids)}")
            on_token = TextStream(self.tokenizer, stream, self.stop_ids, prefix=stream_prefix)
        out = generate_ids(self.params, self.config, prompt_ids, max_new_tokens=max_new_tokens, strategy=strategy,
                           seed=seed, stop_ids=self.stop_ids, mesh=self.mesh, on_token=on_token)
        if on_token is not None:
            on_token.close()
        return out

    def generate(self, prompts: Union[str, Sequence[str]], max_new_tokens: int = 64, temperature: float = 0.8,
                 top_k: Optional[int] = None, top_p: Optional[float] = 0.95, seed: int = 0,
                 stream: Optional[Callable[[str], None]] = None) -> Union[str, List[str]]:
        """Continue each prompt; a list of prompts gives a list of completions, one string gives a string.
        `temperature=0` is greedy; `top_k` / `top_p` restrict the draw; `seed` makes it reproducible."""
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        if not texts:
            raise ValueError("generate: no prompts given")
        ids = [self.encode(t) for t in texts]
        # the prompt's last token is decoded with the completion so a leading space is kept
        out = self.generate_ids(ids, max_new_tokens, temperature, top_k, top_p, seed, stream, ids[0][-1:])
        completions = [decode_continuation(self.tokenizer, i[-1:], o) for i, o in zip(ids, out)]
        return completions[0] if single else completions

    def chat(self, messages, max_new_tokens: int = 256, temperature: float = 0.6, top_k: Optional[int] = None,
             top_p: Optional[float] = 0.9, seed: int = 0, stream: Optional[Callable[[str], None]] = None):
        """Reply to a conversation [{"role": ..., "content": ...}, ...] (or to a list of conversations) in the
        checkpoint's chat format; returns the assistant's reply (or a list of them)."""
        single = bool(messages) and isinstance(messages[0], dict)
        conversations = [messages] if single else list(messages)
        ids = [self.tokenizer.encode_chat(c) for c in conversations]
        out = self.generate_ids(ids, max_new_tokens, temperature, top_k, top_p, seed, stream)
        replies = [self.tokenizer.decode(o).strip() for o in out]
        return replies[0] if single else replies
