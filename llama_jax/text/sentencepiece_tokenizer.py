"""SentencePiece `tokenizer.model` (Llama 1/2, Code Llama), through the `sentencepiece` library."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from llama_jax.errors import TokenizerError
from llama_jax.text.base import Tokenizer


class SentencePieceTokenizer(Tokenizer):
    """BOS/EOS from the model itself; its control pieces (<s>, </s>, ...) are the special tokens."""

    def __init__(self, path: str):
        import sentencepiece as spm

        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a readable SentencePiece model ({e})") from None
        self.vocab_size = self.sp.GetPieceSize()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None

        self._specials = {self.sp.IdToPiece(i): i for i in range(self.vocab_size) if self.sp.IsControl(i)}

    def special_tokens(self) -> Dict[str, int]:
        return self._specials

    def token_id(self, token: str) -> Optional[int]:
        tid = self.sp.PieceToId(token)
        return tid if tid != self.sp.unk_id() or token == self.sp.IdToPiece(tid) else None

    def _encode_text(self, text: str) -> List[int]:
        return list(self.sp.EncodeAsIds(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids if 0 <= int(i) < self.vocab_size])
