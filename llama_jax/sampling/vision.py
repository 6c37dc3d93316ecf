"""Llama 3.2 Vision prompts for the sampler: `<|image|>` tokens in text and chat prompts, and the image arrays.

Legend: B prompts, T tokens, I images (the most any prompt has), X max tiles.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.errors import ImageError, SamplingError
from llama_jax.vision import check_image_counts, cross_attention_mask, preprocess

IMAGE = "<|image|>"


def image_token_id(config: LlamaConfig) -> int:
    """The model's <|image|> id; ImageError for a text-only checkpoint."""
    if config.vision is None or config.image_token_id is None:
        raise ImageError("images were given, but the checkpoint is a text-only model (its config has no vision "
                         "section); use a Llama 3.2 Vision checkpoint, or leave images out")
    return int(config.image_token_id)


def encode_image_prompt(tokenizer, text: str, image_id: int) -> List[int]:
    """A plain-text prompt with `<|image|>` markers -> ids, as transformers' MllamaProcessor builds them: the
    images that open the prompt stay in front of the BOS (`<|image|><|begin_of_text|>Describe...`), the others
    stand where they are written. The text between markers is plain text (its control-token strings stay text)."""
    if not isinstance(text, str) or not text:
        raise SamplingError(f"prompt {text!r} is empty or not a string; give some text to continue")
    parts = text.split(IMAGE)
    lead = 0
    while lead < len(parts) - 1 and parts[lead] == "":
        lead += 1
    ids = [image_id] * lead
    if tokenizer.add_bos and tokenizer.bos_id is not None:
        ids.append(tokenizer.bos_id)
    for k, part in enumerate(parts[lead:]):
        if k:
            ids.append(image_id)
        if part:
            ids.extend(tokenizer.encode(part, bos=False))
    return ids


def chat_image_ids(tokenizer, ids: List[int], image_id: int) -> List[int]:
    """Chat prompt ids with the tokenizer's <|image|> mapped to the model's (Meta's tokenizer.model numbers it
    128011 where the model's embedding row is 128256; a Hugging Face tokenizer.json already agrees)."""
    own = tokenizer.token_id(IMAGE)
    return ids if own is None or own == image_id else [image_id if t == own else t for t in ids]


def image_arrays(config: LlamaConfig, prompts: Sequence[Sequence[int]], images: Sequence[Sequence[Any]], *,
                 checkpoint: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Prompt ids and per-prompt image lists -> numpy pixel_values [B, I, X, C, H, W], aspect_ratio_ids [B, I],
    aspect_ratio_mask [B, I, X], cross_attention_mask [B, T, I, X] (prompts right-padded to the longest),
    num_tiles; None when no prompt has an image. The `<|image|>` tokens of each prompt must match its images one
    to one."""
    image_id = image_token_id(config)
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence) or len(images) != len(prompts):
        n = len(images) if isinstance(images, Sequence) and not isinstance(images, (str, bytes)) else images
        raise ImageError(f"images: got {n!r:.60} for {len(prompts)} prompt(s); expected one list of images per "
                         "prompt, e.g. images=[[img]] for one prompt with one image")
    for b, row in enumerate(images):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise ImageError(f"images[{b}]={row!r:.60}: expected a list of images (PIL images or file paths)")
    check_image_counts(prompts, [len(r) for r in images], image_id)  # before any file is read
    if not any(len(r) for r in images):
        return None  # no image in any prompt: the text model alone, as for images=None
    arrays = preprocess(images, config, checkpoint=checkpoint)
    arrays["cross_attention_mask"] = cross_attention_mask(prompts, arrays["num_tiles"],
                                                          arrays["pixel_values"].shape[2], image_id)
    return arrays


def chat_images(config: LlamaConfig, tokenizer, conversations, ids: List[List[int]],
                checkpoint: Optional[str] = None):
    """Chat prompt ids and their conversations -> (ids with the model's <|image|> id, the image arrays or None
    when no message has an image part). Each image part carries its image: {"type": "image", "image": PIL image
    or path} ("path" is read too)."""
    found = [[_part_image(part, i, j) for i, m in enumerate(c) if not isinstance(m["content"], str)
              for j, part in enumerate(m["content"]) if part["type"] == "image"] for c in conversations]
    if not any(found):
        if config.vision is not None and config.image_token_id is not None:  # e.g. "<|image|>" in a template's text
            check_image_counts(ids, [0] * len(ids), int(config.image_token_id))
        return ids, None
    image_id = image_token_id(config)
    ids = [chat_image_ids(tokenizer, row, image_id) for row in ids]
    return ids, image_arrays(config, ids, found, checkpoint=checkpoint)


def _part_image(part: dict, i: int, j: int):
    for key in ("image", "path"):
        if part.get(key) is not None:
            return part[key]
    raise ImageError(f"chat: message {i} part {j} is an image part without its image; expected "
                     "{'type': 'image', 'image': <PIL image or file path>}")


def padded_image_inputs(arrays: Dict[str, Any], lengths, batch: int, plen: int) -> Dict[str, Any]:
    """`image_arrays` of prompts that the program left-pads to `plen` and a batch of `batch` rows -> the
    model's image inputs: pixel_values [batch, I, X, C, H, W], aspect_ratio_ids / aspect_ratio_mask, and
    cross_attention_mask [batch, plen, I, X], each prompt's rows moved to its padded place (padding sees no
    image; padding rows have no image)."""
    pixels, ids, tiles, seen = (arrays[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask",
                                                    "cross_attention_mask"))
    n = pixels.shape[0]

    def rows(a, dtype):  # batch padding rows: no image
        return np.concatenate([a, np.zeros((batch - n,) + a.shape[1:], a.dtype)]).astype(dtype)

    mask = np.zeros((batch, plen) + seen.shape[2:], np.int32)
    for b, length in enumerate(np.asarray(lengths)[:n]):
        mask[b, plen - length:] = seen[b, :length]
    return {"pixel_values": rows(pixels, np.float32), "aspect_ratio_ids": rows(ids, np.int32),
            "aspect_ratio_mask": rows(tiles, np.int32), "cross_attention_mask": mask}
