"""Which text tokens see which images: the cross-attention mask, built from the `<|image|>` token positions.

As transformers' MllamaProcessor (get_cross_attention_token_mask, convert_sparse_cross_attention_mask_to_dense)
and Meta's chat_format.create_vision_mask: image k is seen from its own `<|image|>` token up to the next image's
token (the last image to the end of the sequence); consecutive image tokens all see everything after the group.

Legend: B prompts, T tokens, I images (the most any prompt has), X max tiles.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from llama_jax.errors import ImageError


def image_spans(ids: Sequence[int], image_token_id: int) -> List[List[int]]:
    """Token ids of one prompt -> per image, [start, end) of the tokens that attend to it (end -1: to the end)."""
    where = [i for i, t in enumerate(ids) if int(t) == image_token_id]
    if len(where) <= 1:
        return [[w, -1] for w in where]
    spans = [[a, b] for a, b in zip(where[:-1], where[1:])] + [[where[-1], len(ids)]]
    last_end = spans[-1][1]
    for span in reversed(spans):  # a run of adjacent image tokens: all of them see what follows the run
        if span[0] == span[1] - 1:
            span[1] = last_end
        last_end = span[1]
    return spans


def check_image_counts(prompts: Sequence[Sequence[int]], num_images: Sequence[int], image_token_id: int) -> None:
    """Refuse a prompt whose `<|image|>` tokens and images differ in number (one line naming the prompt)."""
    if len(prompts) != len(num_images):
        raise ImageError(f"images: {len(num_images)} image lists for {len(prompts)} prompts; expected one list per "
                         "prompt (an empty list for a prompt without images)")
    for b, (ids, n) in enumerate(zip(prompts, num_images)):
        tokens = sum(int(t) == image_token_id for t in ids)
        if tokens != n:
            raise ImageError(f"prompt {b} has {tokens} <|image|> token(s) but {n} image(s) were given for it; "
                             "expected one image per <|image|> token")


def cross_attention_mask(prompts: Sequence[Sequence[int]], num_tiles: Sequence[Sequence[int]], max_tiles: int,
                         image_token_id: int, length: Optional[int] = None) -> np.ndarray:
    """Token-id prompts (right-padded to `length`, default the longest), tiles per image -> int64
    [B, T, I, X]: 1 where token t attends to tile x of image i."""
    check_image_counts(prompts, [len(n) for n in num_tiles], image_token_id)
    length = max(len(p) for p in prompts) if length is None else length
    max_images = max((len(n) for n in num_tiles), default=0)
    mask = np.zeros((len(prompts), length, max_images, max_tiles), np.int64)
    for b, (ids, tiles) in enumerate(zip(prompts, num_tiles)):
        for i, ((start, end), n) in enumerate(zip(image_spans(ids, image_token_id), tiles)):
            end = length if end == -1 else min(end, length)
            mask[b, start:end, i, :n] = 1
    return mask
