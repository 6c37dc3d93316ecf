"""Code Llama: fill-in-the-middle prompt ids against Meta's formulas (codellama's `infilling_prompt_tokens`,
`encode_infilling`, `decode_infilling`, restated below), decoding that stops at ▁<EOT>, the sample.py flags,
the Code Llama 70B Instruct chat format (`dialog_prompt_tokens`) and the Code Llama presets."""

import io
import random

import numpy as np
import pytest

from hf_util import make_hf_model
from llama_jax import LlamaConfig, Sampler
from llama_jax.errors import TokenizerError
from llama_jax.sampling import Greedy, generate_ids
from llama_jax.text.tokenizer import SentencePieceTokenizer, load_tokenizer

INFILL = ["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"]
WORDS = "def return self x y if else for in range print import numpy as np class lambda value result (): , = + 1 2".split()
CASES = [("def f(x):\n    return ", "\n\nprint(f(2))"), ("", "x = 1"), ("import numpy as np\n", ""),
         ("class A:\n  def value(self", ")  \n  ☺ done"), ("  lead", "  one spaces")]


def train_sp(path, pieces, seed=0):
    """A SentencePiece model over code-like text, whitespace kept as Llama's is, with `pieces` user-defined."""
    import sentencepiece as spm

    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) for _ in range(300)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=128,
                                   model_type="bpe", user_defined_symbols=pieces, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   minloglevel=2)
    path.write_bytes(model.getvalue())
    return path


# ---- Meta's codellama tokenizer and prompt, restated from its definition -----------------------------------
class MetaTokenizer:
    def __init__(self, path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.prefix_id, self.suffix_id, self.middle_id, self.eot_id = (self.sp.piece_to_id(p) or None for p in INFILL)
        self.step_id = self.sp.piece_to_id("<step>") or None

    def encode(self, s, bos, eos):
        return ([self.bos_id] if bos else []) + self.sp.encode(s) + ([self.eos_id] if eos else [])

    def encode_infilling(self, s):
        return self.sp.encode("☺" + s)[2:]

    def decode_infilling(self, t):
        return self.sp.decode([self.sp.piece_to_id("☺")] + t)[1:]


def infilling_prompt_tokens(tok, pre, suf, suffix_first=False):
    if suffix_first:
        return ([tok.bos_id, tok.prefix_id, tok.suffix_id] + tok.encode_infilling(suf) + [tok.middle_id]
                + tok.encode(pre, bos=False, eos=False))
    return ([tok.bos_id, tok.prefix_id] + tok.encode(pre, bos=False, eos=False) + [tok.suffix_id]
            + tok.encode_infilling(suf) + [tok.middle_id])


def dialog_prompt_tokens(tok, dialog):
    tokens = [tok.bos_id]
    for message in dialog:
        headers = [f"Source: {message['role'].strip()}"]
        if message.get("destination") is not None:
            headers.append(f"Destination: {message['destination'].strip()}")
        tokens += tok.encode(" " + "\n".join(headers), bos=False, eos=False)
        if message["content"]:
            tokens += tok.encode("\n\n " + message["content"].strip(), bos=False, eos=False)
        tokens += [tok.step_id]
    tokens += tok.encode(" " + "\n".join(["Source: assistant", "Destination: user"]), bos=False, eos=False)
    return tokens + tok.encode("\n\n ", bos=False, eos=False)


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory):
    """A Code-Llama-shaped tiny checkpoint: random weights (vocab 128, as the tokenizer) and a tokenizer with the infilling pieces."""
    d = tmp_path_factory.mktemp("codellama")
    train_sp(d / "tokenizer.model", INFILL + ["☺", "<step>", "\n"])
    make_hf_model(LlamaConfig.from_preset("tiny", vocab_size=128, rope_theta=1e6, initializer_range=0.2), seed=1).save_pretrained(d)
    return d


def test_infill_ids_equal_metas_formulas(code_dir):
    tok, meta = load_tokenizer(code_dir), MetaTokenizer(code_dir / "tokenizer.model")
    assert tok.infill_ids() == (meta.prefix_id, meta.suffix_id, meta.middle_id, meta.eot_id)
    assert None not in tok.infill_ids() and len(set(tok.infill_ids())) == 4
    for pre, suf in CASES:
        for suffix_first in (False, True):
            assert tok.encode_infill(pre, suf, suffix_first=suffix_first) == \
                infilling_prompt_tokens(meta, pre, suf, suffix_first)
        assert tok._encode_infilling(suf) == meta.encode_infilling(suf)
        ids = meta.encode(pre + suf, bos=False, eos=False)
        assert tok.decode_infill(ids) == meta.decode_infilling(ids)
        assert tok.decode_infill(meta.encode_infilling(suf)) == suf  # no space added or lost
    assert tok.decode_infill(meta.encode(" x", bos=False, eos=False)).startswith(" ")  # leading space kept


def test_infilling_without_a_smile_piece(tmp_path):
    """A vocabulary without "☺": the no-leading-space encoding still round-trips."""
    tok = SentencePieceTokenizer(str(train_sp(tmp_path / "tokenizer.model", INFILL + ["\n"])))
    for _, suf in CASES[:3]:
        assert tok.decode_infill(tok._encode_infilling(suf)) == suf
        assert tok.encode_infill("a", suf)[-1] == tok.infill_ids()[2]
    plain = SentencePieceTokenizer(str(train_sp(tmp_path / "plain.model", [])))
    with pytest.raises(TokenizerError, match=r"plain\.model: no Code Llama infilling tokens"):
        plain.encode_infill("a", "b")


def test_infill_stops_at_eot_and_batches(code_dir):
    import llama_jax

    cfg, params = llama_jax.load(str(code_dir))
    tok = load_tokenizer(code_dir)
    eot = tok.infill_ids()[3]
    prompt = tok.encode_infill(*CASES[0])
    raw = generate_ids(params, cfg, [prompt], max_new_tokens=8, strategy=Greedy(), stop_ids=(tok.eos_id, eot))[0]
    # swap ▁<EOT>'s output column with that of a later greedy token: the model now ends the middle there
    k = next(i for i in range(1, len(raw)) if raw[i] not in raw[:i] and raw[i] > eot)
    assert eot not in raw[:k] and tok.eos_id not in raw[:k]
    head = np.asarray(params["lm_head"]).copy()
    head[:, [eot, raw[k]]] = head[:, [raw[k], eot]]
    sampler = Sampler(cfg, dict(params, lm_head=head), tok, per_layer=False)  # reuses the program compiled above
    middle = sampler.infill(*CASES[0], max_new_tokens=8, strategy=Greedy())
    assert middle == MetaTokenizer(code_dir / "tokenizer.model").decode_infilling(raw[:k])
    batch = sampler.infill([c[0] for c in CASES[:3]], [c[1] for c in CASES[:3]], max_new_tokens=8, temperature=0)
    assert len(batch) == 3 and batch[0] == middle and all(isinstance(b, str) for b in batch)


def test_sample_cli_infills(code_dir, tmp_path, capsys):
    import sample

    pre, suf = CASES[0]
    args = ["--checkpoint", str(code_dir), "--max-new-tokens", "5", "--temperature", "0"]
    assert sample.main(args + ["--prefix", pre, "--suffix", suf]) == 0
    expected = Sampler.load(str(code_dir)).infill(pre, suf, max_new_tokens=5, temperature=0)
    assert capsys.readouterr().out == expected + "\n"
    (tmp_path / "pre.py").write_text(pre)
    (tmp_path / "suf.py").write_text(suf)
    assert sample.main(args + ["--prefix-file", str(tmp_path / "pre.py"), "--suffix-file", str(tmp_path / "suf.py")]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_code_llama_70b_chat_equals_metas_dialog_format(code_dir):
    tok, meta = load_tokenizer(code_dir), MetaTokenizer(code_dir / "tokenizer.model")
    assert tok.chat_format == "step" and tok.token_id("<step>") in tok.stop_ids
    dialogs = [[{"role": "user", "content": "write x = 1"}],
               [{"role": "system", "content": " be brief "}, {"role": "user", "content": "def f"},
                {"role": "assistant", "content": "return x", "destination": "user"},
                {"role": "user", "content": "\nif else"}]]
    for dialog in dialogs:
        full = dialog if dialog[0]["role"] == "system" else [{"role": "system", "content": ""}] + dialog
        assert tok.encode_chat(dialog) == dialog_prompt_tokens(meta, full)
    with pytest.raises(ValueError, match="roles must alternate"):
        tok.encode_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


# (hidden, intermediate, layers, heads, kv heads, vocab) of each released config.json; all: theta 1e6, 16K context
CODE_LLAMA = {"7b": (4096, 11008, 32, 32, 32, 32016), "13b": (5120, 13824, 40, 40, 40, 32016),
              "34b": (8192, 22016, 48, 64, 8, 32000), "70b": (8192, 28672, 80, 64, 8, 32016)}


@pytest.mark.parametrize("size", list(CODE_LLAMA))
@pytest.mark.parametrize("variant", ["", "-python", "-instruct"])
def test_code_llama_presets(size, variant):
    c = LlamaConfig.from_preset(f"codellama-{size}{variant}")
    d, f, layers, heads, kv, vocab = CODE_LLAMA[size]
    if variant == "-python" and size in ("7b", "13b"):
        vocab = 32000  # not trained to infill: no infilling tokens
    assert (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads, c.vocab_size) == \
        (d, f, layers, heads, kv, vocab)
    assert (c.rope_theta, c.max_position_embeddings, c.rms_norm_eps, c.rope_scaling) == (1e6, 16384, 1e-5, None)
