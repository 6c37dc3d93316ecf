"""A tokenizer.json that adds no BOS (SmolLM2-style: no post-processor) or says so in tokenizer_config.json
(`add_bos_token`, which transformers 5 ignores next to a tokenizer.json): our ids are transformers' AutoTokenizer ids, and `sample.py --prompt` gives
`LlamaForCausalLM.generate`'s greedy text on a tiny random checkpoint with that tokenizer."""

import json

import numpy as np
import pytest

from llama_jax import LlamaConfig
from llama_jax.text.tokenizer import load_tokenizer

TEXTS = ["Hello world", "the quick brown fox", " leading space", "lazy dog\nover"]  # (plain text: no control tokens)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
BOS_TEMPLATE = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                                                         {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}}
# (post-processor in tokenizer.json, add_bos_token in tokenizer_config.json, does the checkpoint add a BOS?)
# (transformers 5 drops add_bos_token when a tokenizer.json is there: the post-processor alone decides.)
RULES = {"smollm2": (None, None, False), "flag-on-without-post-processor": (None, True, False),
         "flag-off-with-post-processor": (BOS_TEMPLATE, False, True), "post-processor": (BOS_TEMPLATE, None, True)}


@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory):
    """A small byte-level BPE tokenizer.json (as a dict) with SmolLM2's special tokens and no post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = "the quick brown fox jumps over a lazy dog hello world leading space stays text".split()
    rng = np.random.RandomState(0)
    corpus = [" ".join(rng.choice(words, 12)) for _ in range(300)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    d = json.loads(path.read_text())
    d["post_processor"] = None
    return d


def _checkpoint_files(directory, bpe_json, rule):
    post, flag, _ = RULES[rule]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps({**bpe_json, "post_processor": post}))
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}
    if flag is not None:
        tc["add_bos_token"] = flag
    (directory / "tokenizer_config.json").write_text(json.dumps(tc))
    return directory


@pytest.mark.parametrize("rule", list(RULES))
def test_ids_equal_autotokenizer(bpe_json, tmp_path, rule):
    from transformers import AutoTokenizer

    d = _checkpoint_files(tmp_path / rule, bpe_json, rule)
    ref, ours = AutoTokenizer.from_pretrained(str(d)), load_tokenizer(str(d))
    assert ours.bos_id == 0 and ours.add_bos == RULES[rule][2]
    for text in TEXTS:
        assert ours.encode(text) == ref(text)["input_ids"], text


def test_sample_prompt_equals_transformers_greedy(bpe_json, tmp_path, capsys):
    import torch
    from transformers import AutoTokenizer

    import sample
    from hf_util import make_hf_model

    d = _checkpoint_files(tmp_path / "smollm2", bpe_json, "smollm2")
    config = LlamaConfig.from_preset("tiny", vocab_size=len(bpe_json["model"]["vocab"]), num_layers=2,
                                     bos_token_id=0, eos_token_id=2)
    model = make_hf_model(config, seed=1)
    model.generation_config.pad_token_id = 2
    model.save_pretrained(d)
    ref = AutoTokenizer.from_pretrained(str(d))
    prompt = "the quick brown fox"
    ids = ref(prompt, return_tensors="pt")["input_ids"]
    assert int(ids[0, 0]) != 0  # no BOS: the prompt is the text's tokens only
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    expected = ref.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    with torch.no_grad():  # the test can fail: a BOS in front (what encode() did before) changes the text
        with_bos = model.generate(torch.cat([torch.zeros_like(ids[:, :1]), ids], 1), max_new_tokens=8, do_sample=False)
    assert ref.decode(with_bos[0, ids.shape[1] + 1:], skip_special_tokens=True) != expected
    assert sample.main(["--checkpoint", str(d), "--prompt", prompt, "--max-new-tokens", "8",
                        "--temperature", "0"]) == 0
    assert capsys.readouterr().out == prompt + expected + "\n"
