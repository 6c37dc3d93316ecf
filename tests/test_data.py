"""Token files and the packed grain pipeline: packing fields, masks, seed order, per-process rows, iterator
state, chat masking, the prepare command, and that packing keeps documents from seeing each other."""

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import LlamaConfig, init_params
from llama_jax.training import data
from llama_jax.model.transformer import Llama


# $LLAMA_JAX_CACHE of the tests: the built-in corpus is built once per machine, shared by all training tests.
CACHE_ROOT = os.path.join(tempfile.gettempdir(), "llama_jax-test-cache")


def corpus_dir(vocab: int = 512) -> str:
    """The built-in corpus at a small vocabulary (what `python train.py` builds for that vocabulary)."""
    from llama_jax.training import corpus
    return corpus.ensure_default_corpus(vocab, cache_dir=corpus.default_cache_dir(CACHE_ROOT), verbose=False)


class CharTokenizer:
    """Bytes + 3 (0 unk, 1 BOS, 2 EOS): a tokenizer with no training, for fast data tests."""
    vocab_size, bos_id, eos_id = 259, 1, 2

    def encode(self, text, *, bos=True, eos=False):
        return [1] * bos + [b + 3 for b in text.encode()] + [2] * eos

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")


DOCS = ["abc", "defghij", "k", "lmnopqrstu", "vw", "xyz0123456789", "hello world", "zz"]


@pytest.fixture
def char_dir(tmp_path):
    data.write_token_files(str(tmp_path), ({"text": d} for d in DOCS), CharTokenizer(), val_every=0,
                           progress=False)
    return str(tmp_path)


def test_packing_fields(char_dir):
    t = 8
    src = data.PackedSequences(char_dir, "train", t)
    stream = np.concatenate([CharTokenizer().encode(d, eos=True) for d in DOCS])
    starts = np.cumsum([0] + [len(d) + 2 for d in DOCS])[:-1]
    assert len(src) == (len(stream) - 1) // t
    for i in range(len(src)):
        row = src[i]
        idx = np.arange(i * t, i * t + t + 1)
        doc = np.searchsorted(starts, idx, side="right") - 1
        np.testing.assert_array_equal(row["inputs"], stream[idx[:-1]])
        np.testing.assert_array_equal(row["targets"], stream[idx[1:]])
        np.testing.assert_array_equal(row["segment_ids"], doc[:-1] - doc[0] + 1)
        # positions restart at every document start and at the row start
        expected_pos = idx[:-1] - np.maximum(starts[doc[:-1]], i * t)
        np.testing.assert_array_equal(row["positions"], expected_pos)
        # the EOS -> next BOS target crosses documents: no loss there, and only there
        np.testing.assert_array_equal(row["loss_mask"], (doc[:-1] == doc[1:]).astype(np.float32))
        assert row["loss_mask"][row["targets"] == 1].sum() == 0


def test_order_fixed_by_seed_and_rows_split_the_global_batch(char_dir):
    b = 4
    full = data.make_dataset(char_dir, "train", 4, b, seed=3)
    again = data.make_dataset(char_dir, "train", 4, b, seed=3)
    other = data.make_dataset(char_dir, "train", 4, b, seed=4)
    firsts = [full[s]["inputs"] for s in range(6)]
    for s in range(6):
        np.testing.assert_array_equal(firsts[s], again[s]["inputs"])
    assert any(not np.array_equal(firsts[s], other[s]["inputs"]) for s in range(6))
    # two "processes" with rows [0,1] and [2,3] together read exactly the global batch
    halves = [data.make_dataset(char_dir, "train", 4, b, seed=3, rows=r) for r in ([0, 1], [2, 3])]
    for s in range(6):
        np.testing.assert_array_equal(np.concatenate([h[s]["inputs"] for h in halves]), firsts[s])
    # an epoch covers every sequence once, and the next epoch is reshuffled
    n = len(data.PackedSequences(char_dir, "train", 4))
    one = data.make_dataset(char_dir, "train", 4, 1, seed=3)
    epoch1 = [tuple(one[s]["inputs"][0]) for s in range(n)]
    epoch2 = [tuple(one[s]["inputs"][0]) for s in range(n, 2 * n)]
    assert sorted(epoch1) == sorted(epoch2) and epoch1 != epoch2
    assert len(set(epoch1)) == len(epoch1)


def test_iterator_state_resumes_exactly(char_dir):
    ds = data.make_dataset(char_dir, "train", 4, 2, seed=0)
    it = data.make_iterator(ds, threads=2, prefetch=3)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # it travels through a JSON checkpoint item
    expected = [next(it)["inputs"] for _ in range(4)]
    resumed = data.make_iterator(ds, state)
    for e in expected:
        np.testing.assert_array_equal(next(resumed)["inputs"], e)


def test_missing_data_file_is_named(char_dir):
    os.remove(os.path.join(char_dir, "train.docs.npy"))
    with pytest.raises(data.DataError, match="train.docs.npy: missing data file"):
        data.PackedSequences(char_dir, "train", 4)
    with pytest.raises(data.DataError, match="no meta.json"):
        data.PackedSequences(os.path.dirname(char_dir) + "/nowhere", "train", 4)


def test_prepare_chat_masks_the_prompt(tmp_path):
    tok_path = os.path.join(corpus_dir(), "tokenizer.model")
    records = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a list."},
                             {"role": "assistant", "content": "Return a new list."},
                             {"role": "user", "content": "And a tuple?"},
                             {"role": "assistant", "content": "An immutable sequence."}]},
               {"prompt": "What is a dict?", "completion": "A mapping of keys to values."}]
    src = tmp_path / "chat.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "tokens"
    data.main(["prepare", "--tokenizer", tok_path, "--out", str(out), "--val_every", "0", str(src)])
    meta = data.read_meta(str(out))
    assert meta["masked"] and os.path.isfile(out / "train.mask.bin") and os.path.isfile(out / "tokenizer.model")
    tok = data.load_text_tokenizer(tok_path)
    n = meta["splits"]["train"]["tokens"]
    row = data.PackedSequences(str(out), "train", n - 1)[0]
    trained = row["targets"][row["loss_mask"] > 0]
    text = tok.decode([int(t) for t in trained if t not in (tok.bos_id, tok.eos_id)])
    # exactly the assistant replies are trained on (each ends with EOS), nothing of the prompts
    assert [w for w in text.split()] == "Return a new list. An immutable sequence. A mapping of keys to values.".split()
    assert int((trained == tok.eos_id).sum()) == 3


def test_prepare_rejects_bad_records(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"body": "no text field"}\n')
    with pytest.raises(SystemExit, match="expected a 'text'"):
        data.main(["prepare", "--tokenizer", os.path.join(corpus_dir(), "tokenizer.model"), "--out",
                   str(tmp_path / "o"), str(src)])


def test_packed_tokens_do_not_see_other_documents(char_dir):
    """A token's logits depend only on its own document: equal to the document run alone, and unchanged
    when the other documents of the row change."""
    config = LlamaConfig.from_preset("tiny", vocab_size=259)
    params = init_params(config, jax.random.PRNGKey(0))
    model = Llama(config)
    row = data.PackedSequences(char_dir, "train", 24)[1]
    seg = row["segment_ids"]
    assert seg.max() >= 3, "the row should hold several documents"

    forward = jax.jit(lambda p, t, pos, seg: model.apply({"params": p}, t, positions=pos, segment_ids=seg))

    def logits(tokens, positions=None, segments=None):
        tokens = jnp.asarray(tokens)[None]
        positions = None if positions is None else jnp.asarray(positions)[None]
        segments = None if segments is None else jnp.asarray(segments)[None]
        return np.asarray(forward(params, tokens, positions, segments)[0])

    packed = logits(row["inputs"], row["positions"], seg)
    middle = seg == 2  # a whole document with neighbours on both sides
    alone = logits(row["inputs"][middle])
    np.testing.assert_allclose(packed[middle], alone, atol=1e-5, rtol=1e-5)
    scrambled = row["inputs"].copy()
    scrambled[~middle] = (scrambled[~middle] * 7 + 11) % 259
    np.testing.assert_allclose(logits(scrambled, row["positions"], seg)[middle], packed[middle], atol=1e-6)
    # and without segment ids the same tokens do see their neighbours (the test can fail)
    assert not np.allclose(logits(row["inputs"])[middle], alone, atol=1e-3)
