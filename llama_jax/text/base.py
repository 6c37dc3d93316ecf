"""The tokenizer interface every format implements, and what it builds on top: one BOS, stop ids, chat.

A subclass gives `_encode_text` (plain text: special-token strings stay text), `decode`, and, where the
format has control tokens, `special_tokens` / `token_id`. Everything else is here, once.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

from llama_jax.errors import TokenizerError
from llama_jax.text import chat
from llama_jax.text.chat import Message


class Tokenizer:
    """Common interface; subclasses implement `_encode_text`, `decode`, `token_id`, `token_str`."""

    path: str
    bos_id: Optional[int]
    eos_id: Optional[int]
    vocab_size: int
    chat_template: Optional[str] = None
    template_tokens: Dict[str, str] = {}
    extra_stop_ids: Tuple[int, ...] = ()  # e.g. generation_config.json's eos_token_id list
    add_bos: bool = True  # the checkpoint's rule: does its tokenizer put a BOS in front of encoded text?

    def _encode_text(self, text: str) -> List[int]:
        raise NotImplementedError

    def _encode_with_specials(self, text: str) -> List[int]:
        """Encode text in which the tokenizer's special-token strings (as a chat template writes them) are
        control tokens."""
        specials = self.special_tokens()
        if not specials:
            return self._encode_text(text)
        pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
        ids: List[int] = []
        for part in re.split(pattern, text):
            if part in specials:
                ids.append(specials[part])
            elif part:
                ids.extend(self._encode_text(part))
        return ids

    def special_tokens(self) -> Dict[str, int]:
        """{control-token string: id}; empty when the format has none."""
        return {}

    def token_id(self, token: str) -> Optional[int]:
        return self.special_tokens().get(token)

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> List[int]:
        """text -> ids, with one BOS in front when `bos` and the tokenizer's rule adds one (`add_bos`: a
        tokenizer.json whose post-processor adds nothing, SmolLM2-style, gets none), the EOS at the end when
        `eos`."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        ids = self._encode_text(text) if text else []
        if bos and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @property
    def stop_ids(self) -> Tuple[int, ...]:
        """Tokens that end a generation: EOS, and for Llama 3 also end-of-turn and end-of-message."""
        stops = ([self.eos_id] if self.eos_id is not None else []) + list(self.extra_stop_ids)
        for name in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "</s>", "<step>"):  # <step>: Code Llama 70B
            tid = self.token_id(name)
            if tid is not None:
                stops.append(tid)
        return tuple(dict.fromkeys(stops))

    # ---- chat ---------------------------------------------------------------------------------------
    @property
    def chat_format(self) -> str:
        """"template" (the checkpoint's own Jinja chat_template), "llama3", "step" (Code Llama 70B Instruct,
        whose vocabulary has <step>) or "llama2" (also Code Llama 7B-34B Instruct)."""
        if self.chat_template:
            return "template"
        if self.token_id("<step>") is not None:
            return "step"
        return "llama3" if self.token_id("<|start_header_id|>") is not None else "llama2"

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> List[int]:
        """Chat messages [{"role": "system"|"user"|"assistant", "content": str}, ...] -> prompt ids that end
        where the assistant's reply begins."""
        chat.check_messages(messages)
        if self.chat_format == "template":
            return self._encode_with_specials(self.render_chat(messages, add_generation_prompt))
        ids: List[int] = []
        for piece in chat.chat_pieces(self, self.chat_format, messages, add_generation_prompt):
            ids.extend([piece] if isinstance(piece, int) else self._encode_text(piece))
        return ids

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The chat prompt as text, control tokens written out (what a chat template renders)."""
        chat.check_messages(messages)
        if self.chat_format == "template":
            return chat.render_template(self.chat_template, messages, add_generation_prompt, self.template_tokens)
        pieces = chat.chat_pieces(self, self.chat_format, messages, add_generation_prompt)
        return "".join(p if isinstance(p, str) else self.token_str(p) for p in pieces)

    # ---- Code Llama infilling: sentencepiece_tokenizer.py has the four infilling pieces -------------------
    def infill_ids(self) -> Tuple[int, int, int, int]:
        """The ids of ▁<PRE>, ▁<SUF>, ▁<MID>, ▁<EOT>; TokenizerError where the tokenizer has none."""
        raise TokenizerError(f"{self.path}: no Code Llama infilling tokens (▁<PRE>, ▁<SUF>, ▁<MID>, ▁<EOT>) in "
                             f"this {type(self).__name__}; infilling needs a Code Llama 7B/13B/70B tokenizer.model")

    def encode_infill(self, prefix: str, suffix: str, *, suffix_first: bool = False) -> List[int]:
        """Code Llama's fill-in-the-middle prompt ids (see SentencePieceTokenizer.encode_infill)."""
        self.infill_ids()
        raise NotImplementedError

    def decode_infill(self, ids: Sequence[int]) -> str:
        """The infilled middle's text, its leading space kept."""
        return self.decode(ids)

    def token_str(self, token_id: int) -> str:
        """The text of one token: a control token's name, else its decoding."""
        for s, i in self.special_tokens().items():
            if i == token_id:
                return s
        return self.decode([token_id])

    def __repr__(self):
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"
