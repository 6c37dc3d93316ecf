"""GGUF in and out (llama_jax/io/gguf*.py) against the gguf package (llama.cpp's own Python reader, writer and
quantizers), transformers (logits), sentencepiece / tokenizers (token ids) and, when llama-cpp-python is
installed, llama.cpp itself. Files are written by tests/gguf_util.py the way llama.cpp's converter writes them."""

import io
import json
import shutil

import numpy as np
import pytest

from gguf_util import (bpe_vocab, dequantized, hf_weights, sentencepiece_vocab, unpermute,
                       write_gguf)
from llama_jax import LlamaConfig, load
from llama_jax.errors import ConversionError
from llama_jax.io.convert import convert_to_llama_jax, main
from llama_jax.io.formats import open_source
from llama_jax.io.gguf import GGUFSource
from llama_jax.io.gguf_export import export_to_gguf
from llama_jax.model import spec
from test_tokenizer import SAMPLES, byte_to_unicode, corpus

HARD = SAMPLES[:-1] + ["  two  spaces   and\ttabs\n\n", "digits 0 1 12 123 1234 12345 3.14159 -42",
                       "naïve café — 東京 🙂 ☃",
                       "<s> not a control </s>", "<|eot_id|> <|begin_of_text|> text", "ÿþ\x00\x7f", " leading"]
QUANTIZED = ("F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # the gguf package encodes these
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")  # it only decodes these: random blocks


def random_weights(config, seed=0):
    rng = np.random.RandomState(seed)
    out = {}
    for p in spec.params(config):
        for i in (range(config.num_layers) if p.stacked else (None,)):
            shape = p.hf_shape(config)
            out[p.hf_name(i)] = (rng.randn(*shape) * (0.1 if len(shape) > 1 else 0.05) + (len(shape) == 1)
                                 ).astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A SentencePiece BPE model normalised as Meta's Llama tokenizer is (identity, spaces kept)."""
    import sentencepiece as spm

    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=model, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=1.0, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, minloglevel=2)
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
    """A Llama 3-style byte-level BPE (Llama 3's pre-tokenizer, ignore_merges, 256 special tokens) as
    tokenizer.json, and the same ranks as Meta's tiktoken tokenizer.model."""
    import base64

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.pre_tokenizers import ByteLevel, Split

    from llama_jax.text.tokenizer import LLAMA3_PATTERN, llama3_special_tokens

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                                                 ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=600, initial_alphabet=ByteLevel.alphabet(),
                                                          show_progress=False))
    n = tok.get_vocab_size()
    tok.model.ignore_merges = True  # as Meta's Llama 3 tokenizer.json (and tiktoken) do
    tok.add_special_tokens(llama3_special_tokens())
    d = tmp_path_factory.mktemp("bpe")
    tok.save(str(d / "tokenizer.json"))
    to_byte = {c: b for b, c in byte_to_unicode().items()}
    vocab = sorted(((i, t) for t, i in tok.get_vocab(with_added_tokens=False).items() if i < n))
    (d / "tiktoken.model").write_text("".join(base64.b64encode(bytes(to_byte[c] for c in t)).decode() + f" {i}\n"
                                              for i, t in vocab))
    return d, n + 256


@pytest.fixture(scope="module")
def sp_gguf(tmp_path_factory, sp_model):
    """(config, HF weights, F32 GGUF path) of a tiny model with the SentencePiece vocabulary."""
    config = LlamaConfig.from_preset("tiny", num_layers=2, vocab_size=400)
    weights = random_weights(config)
    path = tmp_path_factory.mktemp("g") / "sp.gguf"
    write_gguf(path, config, weights, tokenizer=sentencepiece_vocab(sp_model))
    return config, weights, path


@pytest.fixture(scope="module")
def sp_ckpt(tmp_path_factory, sp_gguf):
    dst = tmp_path_factory.mktemp("c") / "ckpt"
    convert_to_llama_jax(str(sp_gguf[2]), str(dst), progress=False)
    return dst


# ---------------------------------------------------------------------------------------------- import
def test_pattern_equals_the_text_wings():
    from llama_jax.io.gguf_vocab import LLAMA3_PATTERN
    from llama_jax.text.tiktoken_tokenizer import LLAMA3_PATTERN as TEXT_PATTERN

    assert LLAMA3_PATTERN == TEXT_PATTERN


@pytest.mark.parametrize("qtype", QUANTIZED + K_TYPES)
def test_each_type_reads_as_the_gguf_package_dequantizes(qtype, tmp_path):
    # rows of 256 values: whole blocks for every type (K blocks hold 256)
    config = LlamaConfig.from_preset("tiny", num_layers=1, hidden_size=256, intermediate_size=256)
    weights = random_weights(config)
    stored = write_gguf(tmp_path / "m.gguf", config, weights, qtype=qtype)
    source = open_source(tmp_path / "m.gguf")
    assert source.config.replace(bos_token_id=1, eos_token_id=(2,)) == config
    names = {_gguf(hf): hf for hf in weights}
    for name, (kind, data) in stored.items():
        hf = names[name]
        expected = dequantized(kind, data, weights[hf].shape)
        if "attn_q" in name or "attn_k" in name:
            expected = unpermute(expected, config.num_heads if "attn_q" in name else config.num_kv_heads)
        got = source.read(hf)
        assert got.dtype == {"F16": np.float16, "BF16": "bfloat16"}.get(kind, np.float32), (name, got.dtype)
        np.testing.assert_array_equal(got.astype(np.float32), expected, err_msg=name)
        if qtype in QUANTIZED and kind != "F32":  # and it is the weight, to the type's rounding
            np.testing.assert_allclose(expected, weights[hf], atol=0.2 * np.abs(weights[hf]).max(), err_msg=name)
    embed = source.read("model.embed_tokens.weight").astype(np.float32)
    np.testing.assert_array_equal(source.read_rows("model.embed_tokens.weight", 3, 9).astype(np.float32), embed[3:9])


def _gguf(hf):
    from gguf_util import NAMES

    for h, g in NAMES.items():
        for i in range(4):
            if h.format(i=i) == hf:
                return g.format(i=i)


def test_logits_equal_transformers_and_safetensors(tmp_path):
    from hf_util import hf_logits
    from llama_jax.model.transformer import Llama

    config = LlamaConfig.from_preset("tiny", num_layers=2)
    weights, model = hf_weights(config)
    write_gguf(tmp_path / "m.gguf", config, weights)
    model.save_pretrained(tmp_path / "hf")
    cfg, params = load(tmp_path / "m.gguf")
    _, hf_params = load(tmp_path / "hf")
    tokens = np.random.RandomState(1).randint(0, config.vocab_size, (2, 12))
    ours = np.asarray(Llama(cfg).apply({"params": params}, tokens))
    np.testing.assert_array_equal(ours, np.asarray(Llama(cfg).apply({"params": hf_params}, tokens)))
    np.testing.assert_allclose(ours, hf_logits(model, tokens), atol=2e-5, rtol=0)


@pytest.mark.parametrize("scaling", [(8.0, 1.0, 4.0, 8192), (16.0, 2.0, 16.0, 8192)])
def test_llama3_rope_scaling_comes_back_from_rope_freqs(scaling, tmp_path):
    from hf_util import hf_logits
    from llama_jax.model.transformer import Llama

    factor, low, high, original = scaling
    config = LlamaConfig.from_preset("tiny", num_layers=1, rope_scaling=dict(
        rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
        original_max_position_embeddings=original))
    weights, model = hf_weights(config)
    write_gguf(tmp_path / "m.gguf", config, weights)
    cfg, params = load(tmp_path / "m.gguf")
    s = cfg.rope_scaling
    assert (s.rope_type, s.factor, s.original_max_position_embeddings) == ("llama3", factor, original)
    np.testing.assert_allclose((s.low_freq_factor, s.high_freq_factor), (low, high), rtol=1e-4)
    tokens = np.arange(40)[None] % config.vocab_size
    np.testing.assert_allclose(Llama(cfg).apply({"params": params}, tokens), hf_logits(model, tokens), atol=2e-5)


def test_sentencepiece_tokenizer_from_metadata(sp_model, sp_ckpt):
    import sentencepiece as spm

    from llama_jax.text.tokenizer import SentencePieceTokenizer, load_tokenizer

    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    rebuilt = spm.SentencePieceProcessor(model_file=str(sp_ckpt / "tokenizer.model"))
    tok = load_tokenizer(sp_ckpt)
    assert isinstance(tok, SentencePieceTokenizer) and (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 400)
    for text in HARD + corpus(20, seed=3):
        assert rebuilt.encode(text) == ref.encode(text), text
        assert tok.encode(text) == [1] + ref.encode(text), text
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text))
    assert "[{{ m['role'] }}]" in tok.chat_template


@pytest.fixture(scope="module")
def bpe_gguf(tmp_path_factory, bpe_files):
    d, n = bpe_files
    config = LlamaConfig.from_preset("tiny", num_layers=1, vocab_size=n)
    path = tmp_path_factory.mktemp("g") / "bpe.gguf"
    write_gguf(path, config, random_weights(config), tokenizer=bpe_vocab(d / "tokenizer.json"))
    return path


def test_bpe_tokenizer_from_metadata(bpe_files, bpe_gguf, tmp_path):
    from tokenizers import Tokenizer

    from llama_jax.text.tokenizer import HFTokenizer, load_tokenizer

    d, n = bpe_files
    GGUFSource(str(bpe_gguf)).copy_tokenizer(str(tmp_path))
    ref, rebuilt = Tokenizer.from_file(str(d / "tokenizer.json")), Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in HARD + corpus(30, seed=4):
        for specials in (True, False):  # special-token text as text, and as control tokens
            ref.encode_special_tokens = rebuilt.encode_special_tokens = specials
            assert rebuilt.encode(text, add_special_tokens=False).ids == ref.encode(text, add_special_tokens=False).ids
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer) and (tok.bos_id, tok.eos_id, tok.vocab_size) == (n - 256, n - 255, n)
    assert tok.encode("<|eot_id|>", bos=False) != [n - 256 + 9]  # plain text never becomes a control token
    assert tok.encode_chat([{"role": "user", "content": "hi"}])[:2] == [n - 256, n - 256 + 6]


# ---------------------------------------------------------------------------------------------- export
def _tensors(path):
    import gguf

    return {t.name: (t.tensor_type.name, np.array(t.data)) for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_export_then_import_round_trip(kind, sp_gguf, sp_ckpt, tmp_path):
    import gguf

    config, weights, original = sp_gguf
    out = export_to_gguf(str(sp_ckpt), str(tmp_path / "out.gguf"), kind, progress=False)
    written, before = _tensors(out), _tensors(original)
    assert set(written) == set(before)
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    for name, (_, data) in before.items():  # llama.cpp's layout (q/k permuted) encoded as the type says
        wtype, wdata = written[name]
        if data.ndim == 1 or kind == "f32":
            assert wtype == "F32", name
            np.testing.assert_array_equal(wdata, data, err_msg=name)
        elif kind == "f16":
            np.testing.assert_array_equal(wdata, data.astype(np.float16), err_msg=name)
        else:
            np.testing.assert_array_equal(wdata, gguf.quants.quantize(data, qtype), err_msg=name)
    source = open_source(out)
    assert source.config == open_source(original).config
    for hf, w in weights.items():  # and back: the same floats up to the type's rounding
        tol = {"f32": 0, "f16": 1e-3, "bf16": 1e-2, "q8_0": 1e-2, "q4_0": 0.15}[kind] * np.abs(w).max()
        np.testing.assert_allclose(source.read(hf).astype(np.float32), w, atol=tol, rtol=0, err_msg=hf)
    meta, meta0 = source.meta, open_source(original).meta
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert np.array_equal(np.asarray(meta[key]), np.asarray(meta0[key])), key


def test_bpe_export_from_tokenizer_json_and_tiktoken(bpe_files, bpe_gguf, tmp_path):
    """A checkpoint holding a tokenizer.json, or Meta's tiktoken tokenizer.model: the exported GGUF's vocabulary
    tokenizes as the original does."""
    from tokenizers import Tokenizer

    d, n = bpe_files
    ref = Tokenizer.from_file(str(d / "tokenizer.json"))
    tc = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": "{{ bos_token }}x"}
    convert_to_llama_jax(str(bpe_gguf), str(tmp_path / "ckpt"), progress=False)
    for name in ("tokenizer.json", "tiktoken.model"):
        ckpt = tmp_path / name / "ckpt"
        shutil.copytree(tmp_path / "ckpt", ckpt)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (ckpt / f).unlink()
        shutil.copy(d / name, ckpt / ("tokenizer.json" if name.endswith(".json") else "tokenizer.model"))
        (ckpt / "tokenizer_config.json").write_text(json.dumps(tc))
        out = export_to_gguf(str(ckpt), str(tmp_path / name / "m.gguf"), "f16", progress=False)
        source = open_source(out)
        assert source.meta["tokenizer.ggml.pre"] == "llama-bpe"
        assert source.meta["tokenizer.ggml.eos_token_id"] == n - 256 + 9
        source.copy_tokenizer(str(tmp_path / name))
        rebuilt = Tokenizer.from_file(str(tmp_path / name / "tokenizer.json"))
        for text in HARD + corpus(30, seed=5):
            assert rebuilt.encode(text, add_special_tokens=False).ids == ref.encode(text, add_special_tokens=False).ids


def test_command_line_both_ways(sp_gguf, tmp_path, capsys):
    assert main([str(sp_gguf[2]), str(tmp_path / "ckpt"), "--no-progress"]) == 0
    assert main(["--to-gguf", str(tmp_path / "ckpt"), str(tmp_path / "m.gguf"), "--type", "q8_0",
                 "--no-progress"]) == 0
    assert "wrote a GGUF file (q8_0)" in capsys.readouterr().out
    assert main(["--to-gguf", str(tmp_path / "ckpt"), str(tmp_path / "m.gguf"), "--no-progress"]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert _tensors(tmp_path / "m.gguf")["blk.0.attn_q.weight"][0] == "Q8_0"


def test_q4_k_m_goes_through_llama_quantize(sp_ckpt, tmp_path, monkeypatch):
    from llama_jax.io.gguf_export import llama_cpp_tool

    if llama_cpp_tool("llama-quantize") is None:
        monkeypatch.setenv("PATH", str(tmp_path))  # no tool: one line naming it, and nothing left behind
        with pytest.raises(ConversionError, match="llama-quantize"):
            export_to_gguf(str(sp_ckpt), str(tmp_path / "m.gguf"), "q4_k_m", progress=False)
        assert not list(tmp_path.iterdir())
        return
    out = export_to_gguf(str(sp_ckpt), str(tmp_path / "m.gguf"), "q4_k_m", progress=False)
    source = open_source(out)
    assert source.meta["general.file_type"] == 15  # llama.cpp's MOSTLY_Q4_K_M
    # rows of 64 do not fill a 256-value K block, so llama-quantize falls back to Q5_0 / Q8_0 for them
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} & {kind for kind, _ in _tensors(out).values()}


def _no_special_or_byte_outputs(weights, first, last):
    """Zero the output rows of tokens [first, last): greedy text then has only ordinary pieces, which llama.cpp
    and we print alike (it prints control tokens and raw byte pieces; our decode drops the former)."""
    weights = dict(weights)
    head = weights["lm_head.weight"].copy()
    head[first:last] = 0
    weights["lm_head.weight"] = head
    return weights


@pytest.mark.parametrize("vocab", ["sentencepiece", "llama3-bpe"])
def test_llama_cpp_runs_the_export_greedily_as_we_do(vocab, sp_model, bpe_files, tmp_path):
    """llama.cpp itself (its llama-simple example: BOS + prompt, greedy) continues our f32 export with the text
    our Sampler gives: tokenizer metadata, pre-tokenizer, BOS rule, q/k permutation and rope all agree. Runs
    where llama.cpp's tools are on PATH or in $LLAMA_CPP_BIN (see the README's GGUF section)."""
    import subprocess

    from llama_jax.io.gguf_export import llama_cpp_tool
    from llama_jax.sampling import Sampler

    tool = llama_cpp_tool("llama-simple")
    if tool is None:
        pytest.skip("llama.cpp's llama-simple is not on PATH or in $LLAMA_CPP_BIN")
    if vocab == "sentencepiece":
        config = LlamaConfig.from_preset("tiny", num_layers=2, vocab_size=400)
        weights = _no_special_or_byte_outputs(random_weights(config), 0, 259)  # <unk> <s> </s>, 256 bytes
        tokenizer, prompt = sentencepiece_vocab(sp_model), "the quick brown fox 123"
    else:
        d, n = bpe_files
        config = LlamaConfig.from_preset("tiny", num_layers=2, vocab_size=n)
        weights = _no_special_or_byte_outputs(random_weights(config), n - 256, n)  # the special tokens
        tokenizer, prompt = bpe_vocab(d / "tokenizer.json"), "Hello world 12345 it's"
    write_gguf(tmp_path / "in.gguf", config, weights, tokenizer=tokenizer)
    convert_to_llama_jax(str(tmp_path / "in.gguf"), str(tmp_path / "ckpt"), progress=False)
    out = export_to_gguf(str(tmp_path / "ckpt"), str(tmp_path / "out.gguf"), "f32", progress=False)
    done = subprocess.run([tool, "-m", out, "-n", "12", prompt], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    theirs = done.stdout.decode(errors="replace")
    ours = Sampler.load(str(tmp_path / "ckpt")).generate(prompt, 12, temperature=0)
    assert len(ours) > 4 and theirs.endswith(prompt + ours + "\n"), (theirs, ours)


def test_tied_embeddings_have_no_output_tensor(tmp_path):
    config = LlamaConfig.from_preset("tiny", num_layers=1, tie_word_embeddings=True)
    write_gguf(tmp_path / "m.gguf", config, random_weights(config))
    assert "output.weight" not in _tensors(tmp_path / "m.gguf")
    assert open_source(tmp_path / "m.gguf").config.tie_word_embeddings
    convert_to_llama_jax(str(tmp_path / "m.gguf"), str(tmp_path / "ckpt"), progress=False)
    out = export_to_gguf(str(tmp_path / "ckpt"), str(tmp_path / "out.gguf"), "f32", progress=False)
    assert set(_tensors(out)) == set(_tensors(tmp_path / "m.gguf"))


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_transformers_reads_the_export_as_we_do(kind, sp_ckpt, tmp_path):
    """A second GGUF reader: transformers' own GGUF loader (its llama.cpp un-permute and dequantizers) gives the
    exported file the logits we give it, and for f32 those of the checkpoint it came from."""
    import transformers

    from hf_util import hf_logits
    from llama_jax.io.checkpoint import load as load_ckpt
    from llama_jax.model.transformer import Llama

    export_to_gguf(str(sp_ckpt), str(tmp_path / "m.gguf"), kind, progress=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    config, params = load(tmp_path / "m.gguf")
    tokens = np.random.RandomState(2).randint(0, config.vocab_size, (1, 10))
    ours = np.asarray(Llama(config).apply({"params": params}, tokens))
    np.testing.assert_allclose(hf_logits(theirs, tokens), ours, atol=2e-5, rtol=0)
    if kind == "f32":
        _, original = load_ckpt(str(sp_ckpt))
        np.testing.assert_array_equal(ours, np.asarray(Llama(config).apply({"params": original}, tokens)))
