"""Sampling strategies: small frozen dataclasses registered as pytrees, passed through to the compiled program.

A strategy maps (key, logits [B, V]) to tokens [B]: `Greedy()`, or `Sample((Temperature(0.8), TopK(40),
TopP(0.95)))` — any chain of filters on the logits followed by a draw from the softmax. Their fields are traced,
not static, so new values (a new temperature, k or p) never recompile the program.

A new filter (say min-p) is one class here; to give it a knob (`min_p=` on the Sampler methods and in
`sample.py`), add that knob to `make_strategy` — the only place knobs become a strategy.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from typing import Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp

from llama_jax.errors import SamplingError

NEG_INF = -1e30  # a finite "minus infinity": keeps softmax free of NaNs even when a row is all masked


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

_NO_TOP_K = 2 ** 30  # clipped to the vocabulary size: keeps every token


def make_strategy(temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None) -> Strategy:
    """The strategy for the usual knobs: temperature 0 is greedy; top_k / top_p None (or 0 / 1.0) are off.

    Every sampled setting has the same structure, Sample((Temperature, TopK, TopP)) with "off" as k = V-ish
    and p = 1, so switching knobs in a notebook reuses one compiled program."""
    if not _real(temperature) or not 0 <= temperature < math.inf:  # nan fails both comparisons
        raise SamplingError(f"temperature={temperature}: expected 0 (greedy) or a positive finite number")
    if top_k is not None and (not _real(top_k) or not 0 <= top_k < 2**31 or top_k != int(top_k)):
        raise SamplingError(f"top_k={top_k}: expected a number of tokens below 2**31 (int32 on the device; "
                            "0/None for off)")
    if top_p is not None and (not _real(top_p) or not 0 < top_p <= 1):
        raise SamplingError(f"top_p={top_p}: expected a probability in (0, 1] (or None for off)")
    if temperature == 0:
        return Greedy()
    k = int(top_k) if top_k else _NO_TOP_K
    p = float(top_p) if top_p is not None else 1.0
    return Sample((Temperature(float(temperature)), TopK(k), TopP(p)))


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_seed(seed) -> int:
    """A sampling seed as an int; SamplingError unless it is an integer in [-2**63, 2**63) (jax's 64-bit key)."""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not -2**63 <= seed < 2**63:
        raise SamplingError(f"seed={seed}: expected an integer in [-2**63, 2**63)")
    return int(seed)


KNOBS = tuple(inspect.signature(make_strategy).parameters)  # ("temperature", "top_k", "top_p")


def resolve_strategy(strategy: Optional[Strategy], knobs: Mapping[str, object],
                     defaults: Optional[Mapping[str, object]] = None) -> Strategy:
    """`strategy` as given, or the one `make_strategy` builds from `knobs` over `defaults` (a caller's own
    defaults, e.g. the chat's cooler temperature). Giving both a strategy and knobs is an error."""
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise SamplingError(f"unknown sampling knob(s) {unknown}: expected {list(KNOBS)} (or strategy=...)")
    if strategy is not None:
        if knobs:
            raise SamplingError(f"strategy={strategy} and knobs {sorted(knobs)} given: give one or the other")
        return strategy
    return make_strategy(**{**(defaults or {}), **knobs})
