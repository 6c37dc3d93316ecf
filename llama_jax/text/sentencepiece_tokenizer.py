"""SentencePiece `tokenizer.model` (Llama 1/2, Code Llama), through the `sentencepiece` library."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from llama_jax.errors import TokenizerError
from llama_jax.text.base import Tokenizer


INFILL_PIECES = ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>")  # Code Llama's fill-in-the-middle pieces


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

    # ---- Code Llama infilling (Meta's codellama: `infilling_prompt_tokens`, `encode_infilling`) -------------
    def infill_ids(self) -> Tuple[int, int, int, int]:
        """The ids of ▁<PRE>, ▁<SUF>, ▁<MID>, ▁<EOT>, looked up in this tokenizer.model (32007-32010 in the
        released Code Llama 7B/13B/70B); TokenizerError when it has none (Llama 2, Code Llama 34B/Python)."""
        ids = [self.token_id(p) for p in INFILL_PIECES]
        missing = [p for p, i in zip(INFILL_PIECES, ids) if i is None]
        if missing:
            raise TokenizerError(f"{self.path}: no Code Llama infilling tokens ({', '.join(missing)} missing); "
                                 "infilling needs a Code Llama 7B/13B/70B base or Instruct tokenizer.model")
        return tuple(ids)

    def encode_infill(self, prefix: str, suffix: str, *, suffix_first: bool = False) -> List[int]:
        """Prefix-suffix-middle `[BOS, ▁<PRE>] + encode(prefix) + [▁<SUF>] + encode_infilling(suffix) +
        [▁<MID>]`, or with `suffix_first` `[BOS, ▁<PRE>, ▁<SUF>] + encode_infilling(suffix) + [▁<MID>] +
        encode(prefix)`: the model writes the middle next, ending it with ▁<EOT>."""
        if not isinstance(prefix, str) or not isinstance(suffix, str):
            raise TokenizerError(f"encode_infill: prefix and suffix must be str, got {type(prefix).__name__} and "
                                 f"{type(suffix).__name__}")
        pre, suf, mid, _ = self.infill_ids()
        bos = [self.bos_id] if self.bos_id is not None else []
        if suffix_first:
            return bos + [pre, suf] + self._encode_infilling(suffix) + [mid] + self._encode_text(prefix)
        return bos + [pre] + self._encode_text(prefix) + [suf] + self._encode_infilling(suffix) + [mid]

    def decode_infill(self, ids: Sequence[int]) -> str:
        """The middle's text with the leading space of its first piece kept (Meta's `decode_infilling`), so
        prefix + middle + suffix is the file."""
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        smile = self._smile()
        if smile is not None:  # Meta's way: a leading ☺ takes the dropped space, then goes
            return self.sp.DecodeIds([smile] + ids)[1:]
        anchor = list(self.sp.EncodeAsIds("x"))
        head, text = self.sp.DecodeIds(anchor), self.sp.DecodeIds(anchor + ids)
        return text[len(head):] if text.startswith(head) else self.sp.DecodeIds(ids)

    def _smile(self) -> Optional[int]:
        """The id of the piece "☺" (Meta's marker for text with no implicit leading space), if it is one."""
        tid = self.sp.PieceToId("☺")
        return tid if self.sp.IdToPiece(tid) == "☺" else None

    def _encode_infilling(self, text: str) -> List[int]:
        """`text` without SentencePiece's implicit leading space: Meta's encode("☺" + text)[2:] where ☺ is a
        piece, else a copy of the model with the dummy prefix switched off."""
        smile, space = self._smile(), self.sp.PieceToId("▁")
        if smile is not None:
            ids = list(self.sp.EncodeAsIds("☺" + text))
            if ids[:2] == [space, smile]:
                return ids[2:]
        if getattr(self, "_sp_no_prefix", None) is None:
            from sentencepiece import sentencepiece_model_pb2 as pb
            import sentencepiece as spm

            proto = pb.ModelProto()
            proto.ParseFromString(self.sp.serialized_model_proto())
            proto.normalizer_spec.add_dummy_prefix = False
            self._sp_no_prefix = spm.SentencePieceProcessor()
            self._sp_no_prefix.LoadFromSerializedProto(proto.SerializeToString())
        return list(self._sp_no_prefix.EncodeAsIds(text))
