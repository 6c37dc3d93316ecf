"""Tokenizers against their reference libraries, special tokens, one BOS, and chat prompts against
transformers' apply_chat_template. Every tokenizer here is trained by the test on generated text."""

import base64
import io
import json
import random

import pytest

from llama_jax.text.tokenizer import (HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer, TokenizerError,
                                 llama3_special_tokens, load_tokenizer)

WORDS = ("the quick brown fox jumps over lazy dog llama jax token model sample prompt chat héllo wörld naïve "
         "café 東京 data 42 1234 can't it's we're you'll").split()
SAMPLES = ["Hello world", "The quick brown fox, 1234567 jumps!\n\nNew paragraph:  two  spaces",
           "  leading spaces and trailing   ", "naïve café — 東京 🙂", "it's we'RE can't\tTAB\r\nline", "x", ""]

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message.strip() + '\\n<</SYS>>\\n\\n' + message['content'].strip() %}"
    "{% else %}{% set content = message['content'].strip() %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content + ' ' + eos_token }}{% endif %}{% endfor %}")
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there, fox?"},
        {"role": "assistant", "content": "Quick brown."}, {"role": "user", "content": "And the dog\n42"}]


def corpus(n=400, seed=0):
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]
    return lines + SAMPLES


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=model, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, character_coverage=1.0, minloglevel=2)
    (d / "tokenizer.model").write_bytes(model.getvalue())
    return d


def byte_to_unicode():
    """GPT-2's printable stand-ins for bytes, which byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A small Llama 3-style byte-level BPE, written as tokenizer.json and as Meta's tiktoken tokenizer.model."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.pre_tokenizers import ByteLevel, Split

    from llama_jax.text.tokenizer import LLAMA3_PATTERN

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                                                 ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    n = tok.get_vocab_size()
    d = tmp_path_factory.mktemp("bpe")
    tok.save(str(d / "plain.json"))  # without special tokens, for the Llama 2-style test
    tok.add_special_tokens(llama3_special_tokens())
    tok.save(str(d / "tokenizer.json"))
    to_byte = {c: b for b, c in byte_to_unicode().items()}
    vocab = {t: i for t, i in tok.get_vocab(with_added_tokens=False).items() if i < n}
    lines = [base64.b64encode(bytes(to_byte[c] for c in t)).decode() + f" {i}"
             for t, i in sorted(vocab.items(), key=lambda kv: kv[1])]
    (d / "tokenizer.model").write_text("\n".join(lines) + "\n")
    return d, n


def test_sentencepiece_equals_library(sp_dir):
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    tok = load_tokenizer(sp_dir)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.stop_ids) == (400, 1, 2, (2,))
    for text in SAMPLES[:-1] + corpus(20, seed=1):
        ids = tok.encode(text)
        assert ids == [1] + ref.encode(text), text
        assert tok.encode(text, bos=False, eos=True) == ref.encode(text) + [2]
        assert tok.decode(ids) == ref.decode(ref.encode(text))
    assert tok.encode("") == [1]


def test_tiktoken_format_equals_tokenizers_library(bpe_dir):
    d, n = bpe_dir
    tik = load_tokenizer(d / "tokenizer.model")
    hf = load_tokenizer(d / "tokenizer.json")
    assert isinstance(tik, TiktokenTokenizer) and isinstance(hf, HFTokenizer)
    assert tik.vocab_size == hf.vocab_size == n + 256
    assert (tik.bos_id, tik.eos_id) == (hf.bos_id, hf.eos_id) == (n, n + 1)
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(str(d / "tokenizer.json"))
    for text in SAMPLES + corpus(30, seed=2):
        expected = ref.encode(text, add_special_tokens=False).ids
        assert tik.encode(text, bos=False) == expected, text
        assert hf.encode(text, bos=False) == expected, text
        assert tik.decode(expected) == text == hf.decode(expected)


def test_llama3_special_tokens_and_one_bos(bpe_dir):
    d, n = bpe_dir
    tok = load_tokenizer(d / "tokenizer.model")
    specials = llama3_special_tokens()
    assert len(specials) == 256 and len(set(specials)) == 256
    # Meta's numbering relative to the first special id (128000 in the released vocabulary)
    for name, offset in [("<|begin_of_text|>", 0), ("<|end_of_text|>", 1), ("<|reserved_special_token_0|>", 2),
                         ("<|start_header_id|>", 6), ("<|end_header_id|>", 7), ("<|eom_id|>", 8),
                         ("<|eot_id|>", 9), ("<|python_tag|>", 10), ("<|reserved_special_token_247|>", 255)]:
        assert tok.token_id(name) == n + offset, name
    assert set(tok.stop_ids) == {n + 1, n + 8, n + 9}
    ids = tok.encode("hello <|eot_id|> <|begin_of_text|>")
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id and n + 9 not in ids  # plain text stays text
    assert tok.decode(ids) == "hello <|eot_id|> <|begin_of_text|>"
    assert tok.encode("hi", eos=True)[-1] == n + 1


def _hf_fast(d, template, bos, eos):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), bos_token=bos, eos_token=eos,
                                   chat_template=template)


def test_llama3_chat_equals_transformers(bpe_dir):
    d, _ = bpe_dir
    ref = _hf_fast(d, LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>")
    for path in (d / "tokenizer.model", d / "tokenizer.json"):
        tok = load_tokenizer(path)
        assert tok.chat_format == "llama3"
        assert tok.render_chat(CHAT) == ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        expected = ref.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert tok.encode_chat(CHAT) == list(expected)
        assert tok.encode_chat(CHAT).count(tok.bos_id) == 1


def test_llama2_chat_and_checkpoint_template_equal_transformers(bpe_dir, tmp_path):
    d, _ = bpe_dir
    # A Llama 2-style vocabulary: the byte-level BPE with <s> and </s> as its control tokens.
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(d / "plain.json"))
    t.add_special_tokens(["<s>", "</s>"])
    t.save(str(tmp_path / "tokenizer.json"))
    ref = _hf_fast(tmp_path, LLAMA2_TEMPLATE, "<s>", "</s>")
    expected_text = ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    expected = ref.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = load_tokenizer(tmp_path)
    assert tok.chat_format == "llama2" and tok.bos_id == t.token_to_id("<s>")
    assert tok.render_chat(CHAT) == expected_text
    assert tok.encode_chat(CHAT) == expected
    # The same prompt from the checkpoint's own Jinja template.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": LLAMA2_TEMPLATE}))
    tok = load_tokenizer(tmp_path)
    assert tok.chat_format == "template"
    assert tok.render_chat(CHAT) == expected_text and tok.encode_chat(CHAT) == expected
    with pytest.raises(ValueError, match="roles must alternate"):
        tok.encode_chat([{"role": "assistant", "content": "x"}])


def test_bad_paths_are_clear(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="neither tokenizer.model nor tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01garbage")
    with pytest.raises(TokenizerError, match="SentencePiece"):
        load_tokenizer(tmp_path)


def test_checkpoint_files_add_template_and_stop_ids(bpe_dir, tmp_path):
    """transformers >= 4.43 writes chat_template.jinja; Llama 3.1 instruct lists its stops in generation_config."""
    import shutil

    d, n = bpe_dir
    shutil.copy(d / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                                "eos_token": "<|eot_id|>"}))
    (tmp_path / "chat_template.jinja").write_text(LLAMA3_TEMPLATE)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [n + 1, n + 8, n + 9]}))
    tok = load_tokenizer(tmp_path)
    assert tok.chat_format == "template" and tok.eos_id == n + 9
    assert set(tok.stop_ids) == {n + 1, n + 8, n + 9}
    ref = load_tokenizer(d / "tokenizer.model")  # the built-in Llama 3 format gives the same prompt
    assert tok.encode_chat(CHAT) == ref.encode_chat(CHAT)
    long = "ab " * 20 + "x" * 30000 + " " * 30000 + "end"  # runs longer than tiktoken's safe length
    assert ref.decode(ref.encode(long, bos=False)) == long


def test_continuation_keeps_its_leading_space(sp_dir):
    """A completion decoded alone loses SentencePiece's leading space ("▁fox" -> "fox"); decoded after the
    prompt's last token it reads "The quick" + " brown fox", for the returned text and the streamed text."""
    from llama_jax.sampling import TextStream, decode_continuation

    tok = load_tokenizer(sp_dir)
    prompt, new = tok.encode("The quick"), tok.encode("brown fox", bos=False)
    assert not tok.decode(new).startswith(" ")  # the failure this guards against
    assert decode_continuation(tok, prompt[-1:], new) == " brown fox"
    pieces = []
    stream = TextStream(tok, pieces.append, stop_ids=[tok.eos_id], prefix=prompt[-1:])
    for step, token in enumerate(new + [tok.eos_id]):
        stream(step, [token], [False])
    stream.close()
    assert "".join(pieces) == " brown fox"


def test_chat_errors_are_llama_jax_errors(sp_dir):
    """Bad messages are the prompt's fault (SamplingError); a template that cannot render is the checkpoint's
    (TokenizerError); both print as one line from the command lines."""
    from llama_jax.errors import SamplingError

    tok = load_tokenizer(sp_dir)
    with pytest.raises(SamplingError, match="messages is empty"):
        tok.encode_chat([])
    with pytest.raises(SamplingError, match="Llama 2 chat: message 0 has role 'assistant'"):
        tok.encode_chat([{"role": "assistant", "content": "x"}])
    tok.chat_template = "{% for m in messages %}{{ m.content }"
    with pytest.raises(TokenizerError, match="chat template failed to render"):
        tok.encode_chat([{"role": "user", "content": "x"}])
