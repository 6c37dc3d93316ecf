"""Sampling Llama 3.2 Vision with images: greedy tokens equal transformers' generate on a random tiny Mllama
(a batch with one and two images), cached decoding equals step-by-step argmax of the full forward, and chat
with an image part (Sampler.chat and `sample.py --chat --image`) equals generate on MllamaProcessor's inputs.
The checkpoint is transformers' save_pretrained of the model, loaded by Sampler.load as a user's would be."""

import json

import jax
import numpy as np
import pytest

from llama_jax.config import LlamaConfig
from vision_util import hf_processor, photo, vision_tokenizer_dir

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow  # three compiled programs of a vision model: about 40 s of CPU time

TEXTS = ["<|image|>Describe this image.", "a photo <|image|> of <|image|> the fox"]
CHAT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]


def _cut(ids, stops):
    return next((ids[:i] for i, t in enumerate(ids) if t in stops), ids)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(directory, transformers model, config): tokenizer files with <|image|>, the model's safetensors and a
    preprocessor_config.json for its 28-pixel tiles."""
    from mllama_util import make_hf_mllama

    directory, image_id = vision_tokenizer_dir(tmp_path_factory.mktemp("vision") / "ckpt")
    bos = image_id - 256  # the first of Llama 3's special tokens; <|eot_id|> is bos + 9
    config = LlamaConfig.from_preset("tiny-vision", vocab_size=image_id, image_token_id=image_id,
                                     bos_token_id=bos, eos_token_id=(bos + 9,))
    model = make_hf_mllama(config, seed=1)
    model.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "MllamaImageProcessor", "size": {"height": 28, "width": 28}, "max_image_tiles": 4,
         "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
         "resample": 2, "rescale_factor": 1 / 255}))
    photo(60, 40, 1).save(directory / "wide.png")
    return directory, model, config


@pytest.fixture(scope="module")
def sampler(ckpt):
    from llama_jax import Sampler

    return Sampler.load(str(ckpt[0]))


def _hf_greedy(ckpt, text, images, n):
    """transformers' generate on MllamaProcessor's inputs: the new token ids (no stop token)."""
    directory, model, _ = ckpt
    inputs = hf_processor(directory, size=28)(images=[images], text=[text], add_special_tokens=False,
                                              return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_greedy_with_images_equals_transformers_generate(ckpt, sampler):
    from llama_jax.sampling.program import generate_ids
    from llama_jax.sampling.vision import encode_image_prompt, image_arrays

    directory, _, config = ckpt
    images = [[directory / "wide.png"], [photo(30, 90, 2), photo(50, 50, 3)]]  # 1x2, 2x1 and 1x1 tiles
    ids = [encode_image_prompt(sampler.tokenizer, t, config.image_token_id) for t in TEXTS]
    arrays = image_arrays(config, ids, images, checkpoint=str(directory))
    ours = generate_ids(sampler.params, config, ids, max_new_tokens=6, images=arrays, stop_ids=sampler.stop_ids)
    expected = [_cut(_hf_greedy(ckpt, t, im, 6), sampler.stop_ids)
                for t, im in zip(TEXTS, [[photo(60, 40, 1)], images[1]])]
    assert ours == expected and min(map(len, expected)) >= 3
    # the same through Sampler.generate: text in, text out (the compiled program above, reused)
    texts = sampler.generate(TEXTS, images=images, max_new_tokens=6, temperature=0)
    assert texts == [sampler.tokenizer.decode(e) for e in expected]


def test_cached_decoding_equals_full_forward_argmax(ckpt, sampler):
    """The image keys/values written once at prefill and reused by each decode step give the tokens that
    re-running the whole sequence (images included, no cache) gives."""
    from llama_jax.model.mllama import VisionLlama
    from llama_jax.sampling.program import generate_ids
    from llama_jax.sampling.strategies import Greedy
    from llama_jax.sampling.vision import chat_image_ids, image_arrays

    directory, _, config = ckpt
    ids = [chat_image_ids(sampler.tokenizer, sampler.tokenizer.encode_chat(CHAT), config.image_token_id)]
    arrays = image_arrays(config, ids, [[directory / "wide.png"]])
    # the chat test's shapes and stops: one compiled program for both
    cached = generate_ids(sampler.params, config, ids, max_new_tokens=4, images=arrays, strategy=Greedy(),
                          stop_ids=sampler.stop_ids)[0]
    # the full forward over the prompt and the tokens so far, padded to one length (causal: the padding after
    # a position changes nothing before it), so it compiles once; a new token sees what the last one saw
    n = len(ids[0])
    mask = arrays["cross_attention_mask"]
    mask = np.concatenate([mask, np.repeat(mask[:, -1:], 4, axis=1)], axis=1)
    images = {k: arrays[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    forward = jax.jit(lambda p, t: VisionLlama(config).apply({"params": p}, t, cross_attention_mask=mask, **images))
    seq = np.zeros((1, n + 4), np.int32)
    seq[0, :n] = ids[0]
    for i in range(n, n + 4):
        seq[0, i] = int(np.argmax(forward(sampler.params, seq)[0, i - 1]))
    assert cached == _cut(seq[0, n:].tolist(), sampler.stop_ids) and cached


def test_chat_with_an_image_part_and_sample_py(ckpt, sampler, capsys):
    """Sampler.chat with {"type": "image", "image": path} and `sample.py --chat --image FILE` reply as transformers
    does on the processor's inputs for the same rendered chat prompt."""
    import sample

    directory, _, config = ckpt
    png = str(directory / "wide.png")
    conversation = [{"role": "user", "content": [{"type": "image", "image": png}, *CHAT[0]["content"][1:]]}]
    prompt = sampler.tokenizer.render_chat(conversation)
    assert prompt.count("<|image|>") == 1 and prompt.startswith("<|begin_of_text|><|start_header_id|>user")
    expected = _hf_greedy(ckpt, prompt, [photo(60, 40, 1)], 4)
    reply = sampler.chat(conversation, max_new_tokens=4, temperature=0)
    assert reply == sampler.tokenizer.decode(_cut(expected, sampler.stop_ids)).strip()
    assert sample.main(["--checkpoint", str(directory), "--chat", "--image", png, "--prompt", "Describe this image.",
                        "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip() == reply
