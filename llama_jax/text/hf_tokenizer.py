"""A Hugging Face `tokenizer.json`, through the `tokenizers` library."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from llama_jax.errors import TokenizerError
from llama_jax.text.base import Tokenizer


class HFTokenizer(Tokenizer):
    """The file's added special tokens are the control tokens; BOS/EOS come from tokenizer_config.json's
    names, else config.json's ids, else the Llama 3 / Llama 2 names."""

    def __init__(self, path: str, tokenizer_config: Optional[dict] = None, model_config: Optional[dict] = None):
        import tokenizers

        self.path = path
        try:
            self.tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 - the library raises a bare Exception on bad JSON
            raise TokenizerError(f"{path}: not a readable Hugging Face tokenizer.json ({e})") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self._specials = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        tc, mc = tokenizer_config or {}, model_config or {}
        self.bos_id = self._resolve(tc.get("bos_token"), mc.get("bos_token_id"), ("<|begin_of_text|>", "<s>"))
        self.eos_id = self._resolve(tc.get("eos_token"), mc.get("eos_token_id"), ("<|end_of_text|>", "</s>"))
        self.add_bos = self._adds_bos()

    def _adds_bos(self) -> bool:
        """transformers' rule for a tokenizer.json: whether its post-processor writes the BOS (a
        TemplateProcessing "<s> $A"); a file without one adds nothing (SmolLM2-style). tokenizer_config.json's
        `add_bos_token` does not count next to a tokenizer.json (transformers 5 drops it there; it counts for a
        tokenizer.model, see tokenizer.py)."""
        if self.bos_id is None or self.tok.post_processor is None:
            return False
        ids = self.tok.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self.bos_id

    def _resolve(self, token, config_id, fallbacks) -> Optional[int]:
        """A token id from its name (a str or {"content": str}), else a config id (the first of a list), else
        the first fallback name the vocabulary has."""
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and self.tok.token_to_id(token) is not None:
            return self.tok.token_to_id(token)
        if isinstance(config_id, list) and config_id:
            config_id = config_id[0]
        if isinstance(config_id, int):
            return config_id
        for name in fallbacks:
            if self.tok.token_to_id(name) is not None:
                return self.tok.token_to_id(name)
        return None

    def special_tokens(self) -> Dict[str, int]:
        return self._specials

    def token_id(self, token: str) -> Optional[int]:
        return self.tok.token_to_id(token)

    def _encode_text(self, text: str) -> List[int]:
        # add_special_tokens=False: the post-processor would add its own BOS; encode() adds it (see _adds_bos).
        self.tok.encode_special_tokens = True
        return self.tok.encode(text, add_special_tokens=False).ids

    def _encode_with_specials(self, text: str) -> List[int]:
        self.tok.encode_special_tokens = False
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)
