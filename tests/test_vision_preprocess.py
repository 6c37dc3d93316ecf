"""Llama 3.2 Vision inputs without transformers: preprocessing equals MllamaImageProcessor (its PIL path), the
cross-attention mask and prompt ids equal MllamaProcessor's, chat with image parts equals the Vision-Instruct
template (apply_chat_template) and Meta's llama_models chat_format."""

import json

import numpy as np
import pytest

from llama_jax.config import VisionConfig
from llama_jax.sampling.vision import chat_image_ids, encode_image_prompt, image_arrays
from llama_jax.vision import cross_attention_mask, image_spans, preprocess
from vision_util import CLIP_KW, hf_processor, odd_modes, photo, vision_tokenizer_dir

# Llama-3.2-11B-Vision-Instruct's template, cut to what images change (no tools, no date system message)
VISION_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] | trim }}{%- else %}"
    "{%- for content in message['content'] %}{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")
CHAT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]},
        {"role": "assistant", "content": "A quick brown fox."},
        {"role": "user", "content": [{"type": "text", "text": "And this one, "}, {"type": "image"},
                                     {"type": "text", "text": " the lazy dog?"}]}]


@pytest.fixture(scope="module")
def images():
    """Wide, tall, square, tiny, huge, and RGBA / greyscale / palette."""
    return [photo(900, 300, 0), photo(250, 800, 1), photo(600, 600, 2), photo(20, 13, 3),
            photo(2500, 1700, 4)] + odd_modes()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return vision_tokenizer_dir(tmp_path_factory.mktemp("vision_tok"))


def _same(ours, ref):
    for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        assert ours[key].shape == np.shape(ref[key]) and ours[key].dtype == np.asarray(ref[key]).dtype, key
        np.testing.assert_allclose(ours[key], ref[key], rtol=0, atol=1e-5, err_msg=key)
    assert ours["num_tiles"] == ref["num_tiles"]


def test_preprocess_equals_mllama_image_processor(images, tmp_path):
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    images[2].save(tmp_path / "square.png")
    batch = [[images[0], images[1], tmp_path / "square.png"], images[3:5], images[5:]]
    ref = MllamaImageProcessorPil(size={"height": 560, "width": 560}, max_image_tiles=4, **CLIP_KW)
    ours = preprocess(batch, VisionConfig())
    _same(ours, ref([images[:3], images[3:5], images[5:]], return_tensors="np"))
    assert sorted(set(ours["aspect_ratio_ids"].ravel())) == [0, 1, 2, 5, 6]  # 0 pads; 1x1, 1x2, 2x1, 2x2
    assert ours["num_tiles"] == [[2, 2, 4], [1, 4], [1, 1, 1]]


def test_preprocessor_config_json_is_read(images, tmp_path):
    """A checkpoint's preprocessor_config.json decides: other tiles, statistics and filter than the defaults."""
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    kw = {"size": {"height": 56, "width": 56}, "max_image_tiles": 6, "image_mean": [0.5, 0.4, 0.3],
          "image_std": [0.2, 0.25, 0.3], "resample": 3, "rescale_factor": 1 / 255, "do_convert_rgb": True}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**kw, "image_processor_type":
                                                                   "MllamaImageProcessor"}))
    config = VisionConfig(image_size=56, max_num_tiles=6)
    batch = [images[:4], images[4:]]
    ours = preprocess(batch, config, checkpoint=str(tmp_path))
    _same(ours, MllamaImageProcessorPil(**kw)(batch, return_tensors="np"))
    assert ours["pixel_values"].shape[2] == 6 and max(map(max, ours["num_tiles"])) > 4


def test_image_spans_equal_meta():
    from llama_models.llama3.chat_format import create_vision_mask

    for ids in ([9, 1, 2, 3], [1, 9, 2, 9, 3, 4], [9, 9, 1, 2, 9, 3], [9, 9, 9], [1, 2, 9], [1, 2]):
        assert image_spans(ids, 9) == create_vision_mask(ids, 9)


def test_prompt_ids_and_cross_attention_mask_equal_processor(images, tok_dir):
    from llama_jax.text.tokenizer import load_tokenizer

    directory, image_id = tok_dir
    texts = ["<|image|>Describe this image.", "<|image|><|image|>two images then <|image|> one more",
             "a photo <|image|> of a llama, 42"]
    batch = [[images[0]], [images[3], images[1], images[2]], [images[5]]]
    # add_special_tokens=False, as the model card calls it: the processor writes the BOS into the text itself
    ref = hf_processor(directory)(images=batch, text=texts, add_special_tokens=False)
    tok = load_tokenizer(directory)
    ids = [encode_image_prompt(tok, t, image_id) for t in texts]
    assert ids == [list(r) for r in ref["input_ids"]]
    assert preprocess(batch, VisionConfig())["num_tiles"] == [[2], [1, 2, 4], [1]]
    ours = cross_attention_mask(ids, [[2], [1, 2, 4], [1]], 4, image_id)
    np.testing.assert_array_equal(ours, ref["cross_attention_mask"])

    class Config:  # what image_arrays reads of a LlamaConfig
        vision, image_token_id = VisionConfig(), image_id

    arrays = image_arrays(Config, ids, batch)
    np.testing.assert_array_equal(arrays["cross_attention_mask"], ref["cross_attention_mask"])
    np.testing.assert_allclose(arrays["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-5)


def test_chat_with_images_equals_template_and_meta(tok_dir, tmp_path):
    """The checkpoint's own template renders as transformers does; the built-in Llama 3 format (no template)
    gives the tokens Meta's llama_models ChatFormat gives for the same dialog."""
    from transformers import PreTrainedTokenizerFast

    from llama_jax.text.tokenizer import load_tokenizer

    directory, image_id = tok_dir
    ref = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), bos_token="<|begin_of_text|>",
                                  eos_token="<|eot_id|>", chat_template=VISION_TEMPLATE)
    expected_text = ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    expected = ref(expected_text, add_special_tokens=False)["input_ids"]
    (tmp_path / "tokenizer.json").write_bytes((directory / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": VISION_TEMPLATE}))
    templated = load_tokenizer(tmp_path)
    assert templated.chat_format == "template"
    assert templated.render_chat(CHAT) == expected_text
    assert templated.encode_chat(CHAT) == expected and expected.count(image_id) == 2

    builtin = load_tokenizer(directory)
    assert builtin.chat_format == "llama3"
    assert builtin.encode_chat(CHAT) == _meta_dialog_tokens(builtin, image_id)
    assert chat_image_ids(builtin, builtin.encode_chat(CHAT), 7) == [7 if t == image_id else t
                                                                    for t in builtin.encode_chat(CHAT)]


def _meta_dialog_tokens(tok, image_id):
    """Meta's ChatFormat.encode_dialog_prompt over our tokenizer's ids (Meta's special ids are numbered like
    ours; it writes the image as 128256, the model's row, which we map back to the tokenizer's id)."""
    import io

    from llama_models.datatypes import RawMediaItem, RawMessage, RawTextItem
    from llama_models.llama3.chat_format import ChatFormat
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")

    class MetaTokenizer:  # the two things ChatFormat uses: encode and the special-token table
        special_tokens = {**tok.special_tokens(), "<|image|>": image_id}

        def encode(self, s, bos, eos):
            return tok.encode(s, bos=bos, eos=eos)

    def part(p):
        return RawMediaItem(data=png.getvalue()) if p["type"] == "image" else RawTextItem(text=p["text"])

    messages = [RawMessage(role=m["role"], content=m["content"] if isinstance(m["content"], str)
                           else [part(p) for p in m["content"]]) for m in CHAT]
    out = ChatFormat(MetaTokenizer()).encode_dialog_prompt(messages)
    return [image_id if t == 128256 else t for t in out.tokens]
