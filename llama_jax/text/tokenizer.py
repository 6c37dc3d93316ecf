"""One tokenizer interface over the three formats Llama checkpoints ship, and `load_tokenizer` to pick one.

- SentencePiece `tokenizer.model` (Llama 1/2, Code Llama): sentencepiece_tokenizer.py;
- Meta's tiktoken-format `tokenizer.model` (Llama 3.x): tiktoken_tokenizer.py;
- a Hugging Face `tokenizer.json`: hf_tokenizer.py.

`load_tokenizer(path)` picks one from a file or a checkpoint directory and adds what the directory's JSON
files say (BOS/EOS names, a Jinja `chat_template`, extra stop ids). Every tokenizer (base.py) has
`encode(text, *, bos=True, eos=False) -> list[int]` (one BOS, never one added by the backend, and only
where the checkpoint's tokenizer adds one: `add_bos`, as transformers decides: a tokenizer.json's
post-processor; for a tokenizer.model (SentencePiece, tiktoken) yes unless tokenizer_config.json says
"add_bos_token": false),
`decode(ids) -> str`, `bos_id`, `eos_id`, `stop_ids`, `vocab_size`, and `encode_chat(messages)` /
`render_chat(messages)` for Llama 2 chat, Llama 3 instruct or the checkpoint's own template (chat.py).
Plain `encode` never turns text like "<|eot_id|>" into a control token; only chat formats emit them.

This module also re-exports the names other modules import from it.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional

from llama_jax.errors import TokenizerError
from llama_jax.text.base import Tokenizer
from llama_jax.text.chat import Message, Piece, render_template
from llama_jax.text.hf_tokenizer import HFTokenizer
from llama_jax.text.sentencepiece_tokenizer import SentencePieceTokenizer
from llama_jax.text.tiktoken_tokenizer import (LLAMA3_PATTERN, NUM_LLAMA3_SPECIAL, TiktokenTokenizer,
                                               is_tiktoken_file, llama3_special_tokens, read_tiktoken_ranks)

__all__ = ["HFTokenizer", "LLAMA3_PATTERN", "Message", "NUM_LLAMA3_SPECIAL", "Piece", "SentencePieceTokenizer",
           "TiktokenTokenizer", "Tokenizer", "TokenizerError", "is_tiktoken_file", "llama3_special_tokens",
           "load_tokenizer", "read_tiktoken_ranks", "render_template"]


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of a checkpoint or Hugging Face directory, or of a `tokenizer.model` / `tokenizer.json`
    file. A directory's `tokenizer_config.json` supplies the BOS/EOS names and a Jinja `chat_template`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TokenizerError(f"load_tokenizer: {path!r} does not exist")
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    file = _tokenizer_file(path) if os.path.isdir(path) else path
    if os.path.isfile(file) and os.path.getsize(file) == 0:
        raise TokenizerError(f"{file}: the file is empty (0 bytes); expected a tokenizer (SentencePiece model, "
                             "tiktoken ranks or tokenizer.json)")
    # special_tokens_map.json names BOS/EOS for older checkpoints; tokenizer_config.json's names come first
    tc = {**_read_json(os.path.join(directory, "special_tokens_map.json")),
          **_read_json(os.path.join(directory, "tokenizer_config.json"))}
    generation = _read_json(os.path.join(directory, "generation_config.json"))  # read (and checked) up front
    if file.endswith(".json"):
        tok: Tokenizer = HFTokenizer(file, tc, _read_json(os.path.join(directory, "config.json")))
    elif is_tiktoken_file(file):
        tok = TiktokenTokenizer(file)
    else:
        tok = SentencePieceTokenizer(file)
    if not file.endswith(".json") and isinstance(tc.get("add_bos_token"), bool):
        tok.add_bos = tc["add_bos_token"]  # (a tokenizer.json's rule is HFTokenizer's: see there)
    template = _chat_template(directory, tc)
    if template:
        tok.chat_template = template
        tok.template_tokens = _template_tokens(tok, tc)
    eos = generation.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else []
    tok.extra_stop_ids = tuple(int(e) for e in eos if isinstance(e, int) and 0 <= e < tok.vocab_size)
    return tok


def _tokenizer_file(directory: str) -> str:
    """The directory's tokenizer.model, else its tokenizer.json."""
    candidates = [os.path.join(directory, n) for n in ("tokenizer.json", "tokenizer.model")]
    found = [c for c in candidates if os.path.exists(c)]
    if not found:
        raise TokenizerError(f"load_tokenizer: {directory!r} has neither tokenizer.model nor tokenizer.json "
                             "(copy the checkpoint's tokenizer files into it)")
    # A tokenizer.model next to a tokenizer.json is the original: prefer it (exact reference behaviour).
    return found[-1]


def _chat_template(directory: str, tc: dict) -> Optional[str]:
    """The checkpoint's Jinja chat template: tokenizer_config.json's, else chat_template.jinja (newer
    transformers), else chat_template.json's; of a list of named templates, the "default" one."""
    template = tc.get("chat_template")
    if template is None and os.path.isfile(os.path.join(directory, "chat_template.jinja")):
        with open(os.path.join(directory, "chat_template.jinja"), encoding="utf-8") as f:
            template = f.read()
    if template is None:
        template = _read_json(os.path.join(directory, "chat_template.json")).get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) and template else None


def _template_tokens(tok: Tokenizer, tc: dict) -> Dict[str, Optional[str]]:
    """The token strings a template may use (bos_token, ...): tokenizer_config.json's, else BOS/EOS's text."""
    tokens = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = tc.get(key)
        tokens[key] = value.get("content") if isinstance(value, dict) else value
    for key, tid in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id)):
        if tokens.get(key) is None and tid is not None:
            tokens[key] = tok.token_str(tid)
    return tokens


def _read_json(path: str) -> dict:
    """The JSON object in `path`, or {} when there is no such file."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(d, dict):
        raise TokenizerError(f"{path}: a JSON {type(d).__name__}, expected an object of settings")
    return d
