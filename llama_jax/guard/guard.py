"""`Guard`: a Llama Guard checkpoint that classifies conversations as safe or unsafe.

    guard = Guard.load("Llama-Guard-3-8B")                       # any directory Sampler.load reads
    [v] = guard.classify([[{"role": "user", "content": "How do I bake bread?"}]])
    v.safe, v.categories, v.p_unsafe                               # True, [], 0.0013

The prompt is the checkpoint's own chat template when it has one, else the built-in format of `version`
(format.py). Each conversation's answer is decoded greedily (verdict.py reads it); `p_unsafe` is the
probability of `unsafe` against `safe` at the answer's first token (after any whitespace the model writes
first, e.g. Llama Guard 3's "\\n\\n"), the score Meta's model cards use for thresholds. All conversations are
scored by one compiled, batched forward pass.
"""

from __future__ import annotations

import contextlib
import functools
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.cpu.decode_layout import decoding_model
from llama_jax.errors import SamplingError
from llama_jax.guard.format import (Category, check_conversation, check_version, format_prompt, numbered,
                                    template_prompt)
from llama_jax.guard.verdict import Verdict, parse_verdict
from llama_jax.parallel.sharding import use_mesh
from llama_jax.sampling.program import bucket, kv_mask, prefill
from llama_jax.sampling.sampler import Sampler
from llama_jax.sampling.strategies import Greedy


class Guard:
    """`Guard(sampler, version=None, use_template=None)` wraps a loaded Sampler. `version` (1, 2 or 3) picks
    the built-in format; default 3 for a Llama 3 vocabulary, else 1. `use_template` (default: when the
    tokenizer has a chat template) renders the checkpoint's own template instead."""

    def __init__(self, sampler: Sampler, version: Optional[int] = None, use_template: Optional[bool] = None):
        tok = sampler.tokenizer
        if version is None:
            version = 3 if tok.token_id("<|start_header_id|>") is not None else 1
        check_version(version)
        if use_template and not tok.chat_template:
            raise SamplingError(f"guard: use_template=True but {tok.path!r} has no chat template")
        self.sampler, self.version = sampler, version
        self.use_template = bool(tok.chat_template) if use_template is None else use_template
        # the first token of each word as the model writes it (SentencePiece: "▁safe"; tiktoken: "safe")
        self.safe_id, self.unsafe_id = (tok.encode(w, bos=False)[0] for w in ("safe", "unsafe"))
        if self.safe_id == self.unsafe_id:
            raise SamplingError(f"guard: {tok.path!r} starts 'safe' and 'unsafe' with the same token; not a Llama "
                                "Guard tokenizer")

    @classmethod
    def load(cls, path, *, version: Optional[int] = None, use_template: Optional[bool] = None, **sampler_kwargs
             ) -> "Guard":
        """A Llama Guard checkpoint (anything `Sampler.load` reads; its keywords: mesh, int8, dtype, ...)."""
        return cls(Sampler.load(path, **sampler_kwargs), version=version, use_template=use_template)

    def prompt(self, conversation: Sequence[dict], *, categories: Optional[Sequence[Category]] = None,
               excluded: Sequence[str] = (), role: Optional[str] = None) -> str:
        """The prompt text for one conversation (see format.format_prompt; a template picks the role)."""
        if self.use_template:
            if role is not None:
                raise SamplingError("guard: role= applies to the built-in formats; this checkpoint's chat template "
                                    "judges the last message's side (Guard(..., use_template=False) to choose)")
            tok = self.sampler.tokenizer
            return template_prompt(tok.chat_template, conversation, tok.template_tokens, categories=categories,
                                   excluded=excluded, version=self.version)
        return format_prompt(conversation, version=self.version, categories=categories, excluded=excluded, role=role)

    def encode(self, prompt: str) -> List[int]:
        """Prompt text -> ids: control tokens written in it recognised, exactly one BOS in front."""
        tok = self.sampler.tokenizer
        ids = tok._encode_with_specials(prompt)
        if tok.bos_id is not None and ids[:1] != [tok.bos_id]:
            ids = [tok.bos_id] + ids
        return ids

    def classify(self, conversations: Sequence[Sequence[dict]], *, categories: Optional[Sequence[Category]] = None,
                 excluded: Sequence[str] = (), role: Optional[str] = None, max_new_tokens: int = 20
                 ) -> List[Verdict]:
        """One Verdict per conversation (a list of {"role": "user"|"assistant", "content": str}; a single
        conversation is taken as a batch of one)."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        if not conversations:
            raise SamplingError("guard: no conversations given")
        for c in conversations:
            check_conversation(c)
        ids = [self.encode(self.prompt(c, categories=categories, excluded=excluded, role=role))
               for c in conversations]
        tok = self.sampler.tokenizer
        answers = self.sampler.generate_ids(ids, max_new_tokens, strategy=Greedy())
        leads = [_whitespace_lead(tok, a) for a in answers]
        p_unsafe = self.p_unsafe([i + a[:n] for i, a, n in zip(ids, answers, leads)])
        known = None
        if not self.use_template or categories is not None:
            known = {code for code, _ in numbered(categories, self.version, excluded)}
        return [parse_verdict(tok.decode(a), float(p), known) for a, p in zip(answers, p_unsafe)]

    def p_unsafe(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """P(unsafe) / (P(unsafe) + P(safe)) for the token after each id sequence: [len(sequences)] float32,
        from one compiled forward over the batch (left-padded, bucketed like the sampler's prompts)."""
        s = self.sampler
        batch, plen = bucket(len(sequences), minimum=1), bucket(max(len(q) for q in sequences))
        tokens, lengths = np.zeros((batch, plen), np.int32), np.ones((batch,), np.int32)
        for row, q in enumerate(sequences):
            tokens[row, plen - len(q):], lengths[row] = q, len(q)
        pair = jnp.asarray([self.safe_id, self.unsafe_id])
        with use_mesh(s.mesh) if s.mesh is not None else contextlib.nullcontext():
            p = _p_unsafe(s.params, jnp.asarray(tokens), jnp.asarray(lengths), pair, config=s.config)
        return np.asarray(jax.device_get(p))[:len(sequences)]


@functools.partial(jax.jit, static_argnames=("config",))
def _p_unsafe(params, tokens, lengths, pair, *, config):
    """tokens [B, P] left-padded, lengths [B], pair [2] (safe, unsafe ids) -> [B] the softmax of the two logits
    at each row's last token, taking unsafe."""
    batch, plen = tokens.shape
    _, new_cache = decoding_model(config, params)
    logits, _ = prefill(config, params, tokens, lengths, new_cache(config, batch, plen), kv_mask(lengths, plen, plen))
    return jax.nn.softmax(logits[:, 0, :].astype(jnp.float32)[:, pair], axis=-1)[:, 1]  # [B]


def _whitespace_lead(tok, answer: Sequence[int]) -> int:
    """How many of the answer's first tokens decode to whitespace only (Llama Guard 3 writes "\\n\\n" first)."""
    n = 0
    while n < len(answer) and not tok.decode(list(answer[:n + 1])).strip():
        n += 1
    return n
