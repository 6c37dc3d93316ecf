"""Helpers shared by the vision tests: photograph-like images and a tiny Llama 3-style tokenizer with <|image|>."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

CLIP_KW = dict(image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
               resample=2)
WORDS = "the quick brown fox jumps over a lazy dog describe this image photo of llama café 42".split()


def photo(width: int, height: int, seed: int):
    """A PIL RGB image with what photographs have and flat test patterns lack: gradients, noise, edges."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], -1)
    base = base + rng.normal(0, 20, base.shape)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [x0, y0, x0 + int(rng.integers(1, width // 2 + 2)), y0 + int(rng.integers(1, height // 2 + 2))]
        fill = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return image


def odd_modes():
    """RGBA with a graded alpha, greyscale, and a palette image: each converted to RGB as transformers does."""
    from PIL import Image

    rgba = np.array(photo(300, 200, 5).convert("RGBA"))
    rgba[..., 3] = np.linspace(0, 255, 300).astype(np.uint8)[None]
    return [Image.fromarray(rgba), photo(200, 300, 6).convert("L"), photo(200, 300, 7).convert("P")]


def vision_tokenizer_dir(directory: Path) -> tuple:
    """A byte-level BPE tokenizer.json (about 300 tokens) + Llama 3's 256 special tokens + <|image|> after them,
    as the released Llama 3.2 Vision tokenizer has it; tokenizer_config.json names BOS and EOS.
    -> (directory, image token id)."""
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers.pre_tokenizers import ByteLevel, Split

    from llama_jax.text.tokenizer import LLAMA3_PATTERN, llama3_special_tokens

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) for _ in range(200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                                                 ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=ByteLevel.alphabet(),
                                                        show_progress=False))
    tok.add_special_tokens(llama3_special_tokens() + ["<|image|>"])
    bos = tok.token_to_id("<|begin_of_text|>")  # the released tokenizer.json's post-processor adds the BOS
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                                 "eos_token": "<|eot_id|>"}))
    return directory, tok.token_to_id("<|image|>")


def hf_processor(directory: Path, max_image_tiles: int = 4, size: int = 560, chat_template=None):
    """transformers' MllamaProcessor (PIL image processor + fast tokenizer) over `vision_tokenizer_dir`."""
    from transformers import MllamaProcessor, PreTrainedTokenizerFast
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tok = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), bos_token="<|begin_of_text|>",
                                  eos_token="<|eot_id|>", chat_template=chat_template)
    images = MllamaImageProcessorPil(size={"height": size, "width": size}, max_image_tiles=max_image_tiles,
                                     **CLIP_KW)
    return MllamaProcessor(images, tok, chat_template=chat_template)
