"""lm-evaluation-harness on our model (llama_jax.eval) against lm-eval's own Hugging Face backend (HFLM) on the
same random tiny weights loaded in transformers: tokenization and the BOS rule, per-request log-likelihoods
(also on a mesh), rolling windows, greedy generation with a stop string, and the metrics of a local
multiple-choice task and a local perplexity task (tests/eval_tasks). Nothing touches the network."""

import json
import os
import random
import socket

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hf_util import make_hf_model  # noqa: E402

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from llama_jax.config import LlamaConfig  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS_DIR = os.path.join("tests", "eval_tasks")  # relative: the YAMLs name their data files from the repo root
WORDS = "the quick brown fox jumps over lazy dog cat sat on mat red hat a an is was".split()
CONTEXT = 64  # the model's context: the long perplexity document needs two windows


def train_tokenizer(directory, bos_post_processor=True):
    """A Llama 3-style byte-level BPE (tokenizer.json + tokenizer_config.json) trained on WORDS."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers.pre_tokenizers import ByteLevel, Split

    from llama_jax.text.tokenizer import LLAMA3_PATTERN

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) for _ in range(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                                                 ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=ByteLevel.alphabet(), show_progress=False,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"]))
    if bos_post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", 0)])
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                   "eos_token": "<|end_of_text|>"}, f)
    return directory


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(HF directory, llama_jax checkpoint converted from it): one random tiny model, fp32."""
    from llama_jax.io.convert import convert_to_llama_jax

    root = tmp_path_factory.mktemp("eval")
    hf_dir = train_tokenizer(str(root / "hf"))
    config = LlamaConfig.from_preset("tiny", vocab_size=384, max_position_embeddings=CONTEXT, bos_token_id=0,
                                     eos_token_id=(1,))
    make_hf_model(config, seed=3).save_pretrained(hf_dir)
    return hf_dir, convert_to_llama_jax(hf_dir, str(root / "ours"), progress=False)


@pytest.fixture(scope="module")
def ours(dirs):
    from llama_jax.eval import JaxLM
    return JaxLM.load(dirs[1], batch_size=4)


@pytest.fixture(scope="module")
def hflm(dirs):
    from lm_eval.models.huggingface import HFLM
    return HFLM(pretrained=dirs[0], device="cpu", dtype="float32", batch_size=4)


@pytest.fixture
def offline(monkeypatch):
    """Run from the repository root (the task YAMLs' data paths), with any network connection an error."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def tensorboard_scalars(logdir):
    """{(tag, step): value} of every scalar in the TensorBoard event files of `logdir` (TFRecord framing:
    length u64, its crc u32, the Event proto, its crc u32)."""
    import struct

    from tensorboardX.proto import event_pb2

    found = {}
    for name in os.listdir(logdir):
        data = open(os.path.join(logdir, name), "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 16 + length
            for value in event.summary.value:
                found[(value.tag, event.step)] = value.simple_value
    return found


def requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_tokens_and_bos_rule_equal_hflm(ours, hflm, tmp_path):
    from transformers import AutoTokenizer

    from llama_jax.eval import adds_bos
    from llama_jax.text.tokenizer import load_tokenizer

    for text in ("the quick fox", " a cat", "<|begin_of_text|>the dog", "sat<|end_of_text|> on", ""):
        assert ours.tok_encode(text) == hflm.tok_encode(text), text
        assert ours.tok_encode(text, add_special_tokens=False) == hflm.tok_encode(text, add_special_tokens=False)
    assert (ours.prefix_token_id, ours.eot_token_id, ours.max_length) == (
        hflm.prefix_token_id, hflm.eot_token_id, hflm.max_length)
    # a tokenizer.json whose post-processor adds nothing: no BOS, in transformers and here
    plain = train_tokenizer(str(tmp_path / "plain"), bos_post_processor=False)
    assert AutoTokenizer.from_pretrained(plain).encode("the fox")[0] != 0
    assert ours.add_bos and not adds_bos(load_tokenizer(plain))


def test_loglikelihoods_equal_hflm_also_on_a_mesh(ours, hflm):
    from llama_jax.eval import JaxLM
    from llama_jax.parallel.sharding import make_mesh
    from llama_jax.sampling import Sampler

    long_context = " ".join(WORDS * 5)  # longer than the context: cut on the left, as HFLM does
    pairs = [("the quick", " brown fox"), ("a cat sat on", " the mat"), ("", "the lazy dog"),
             ("red hat is", " lazy dog was"), (long_context, " over the mat")]
    reqs = requests("loglikelihood", pairs)
    got, want = ours.loglikelihood(reqs, disable_tqdm=True), hflm.loglikelihood(reqs, disable_tqdm=True)
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5, atol=1e-4)
    assert [g[1] for g in got] == [w[1] for w in want]

    docs = requests("loglikelihood_rolling", [(" ".join(WORDS * 4),), ("the cat sat on the mat",)])
    np.testing.assert_allclose(ours.loglikelihood_rolling(docs, disable_tqdm=True),
                               hflm.loglikelihood_rolling(docs, disable_tqdm=True), rtol=1e-5, atol=1e-4)
    # rows of many lengths, one compiled program per length bucket (8, 16, 32, 64 here), shared by every JaxLM
    assert ours.scorer._fn._cache_size() <= 4

    s = ours.sampler  # the same weights split over 8 fake devices (batch over the batch axes, heads over tensor)
    sharded = JaxLM(Sampler(s.config, s.params, s.tokenizer, mesh=make_mesh(tensor=2), per_layer=False),
                    batch_size=3)
    assert sharded.batch_size == 4  # rounded up to the 4 batch shards
    np.testing.assert_allclose([g[0] for g in sharded.loglikelihood(reqs, disable_tqdm=True)],
                               [g[0] for g in got], rtol=1e-5, atol=1e-4)


def test_generate_until_equals_hf_greedy_with_a_stop_string(ours, hflm):
    contexts = ["the quick", "a cat sat on the"]
    free = {"until": [], "max_gen_toks": 40, "do_sample": False}  # 40 > FIRST_BUDGET: a second round runs
    reference = hflm.generate_until(requests("generate_until", [(c, free) for c in contexts]), disable_tqdm=True)
    assert ours.generate_until(requests("generate_until", [(c, free) for c in contexts]),
                               disable_tqdm=True) == reference
    stop = next(reference[0][i:i + 2] for i in range(3, len(reference[0]))
                if "\ufffd" not in reference[0][i:i + 2])  # two characters from the middle of a generation
    cut = {"until": [stop], "max_gen_toks": 40, "do_sample": False}
    reqs = requests("generate_until", [(c, cut) for c in contexts])
    got = ours.generate_until(reqs, disable_tqdm=True)
    assert got == hflm.generate_until(reqs, disable_tqdm=True)
    assert len(got[0]) < len(reference[0]) and stop not in got[0]


def loglikelihoods(results, task):
    """Every request's log-likelihood in a results dict with samples (resps: [[ll]] or [[(ll, greedy)]])."""
    values = [r[0] for sample in results["samples"][task] for r in sample["resps"]]
    values = [v[0] if isinstance(v, (list, tuple)) else v for v in values]
    assert values
    return np.asarray(values, float)


def test_task_metrics_and_samples_equal_hflm(ours, hflm, offline, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from llama_jax.eval import evaluate, log_tensorboard, save_results, scalars

    tasks = ["llama_jax_tiny_mc", "llama_jax_tiny_ppl"]
    got = evaluate(ours, tasks, include_path=TASKS_DIR, log_samples=True, bootstrap_iters=0)
    want = lm_eval.simple_evaluate(model=hflm, tasks=tasks, log_samples=True, bootstrap_iters=0,
                                   task_manager=TaskManager(include_path=TASKS_DIR, include_defaults=False))
    assert sorted(scalars(got)) == sorted(scalars(want)) and len(scalars(got)) == 5
    for name, value in scalars(want).items():
        assert scalars(got)[name] == pytest.approx(value, rel=1e-5), name
    for task in tasks:  # every request's log-likelihood
        np.testing.assert_allclose(loglikelihoods(got, task), loglikelihoods(want, task), rtol=1e-5, atol=1e-4)
    assert got["n-samples"]["llama_jax_tiny_mc"]["effective"] == 4

    saved = json.loads(open(save_results(got, str(tmp_path / "results.json"))).read())
    assert saved["results"]["llama_jax_tiny_mc"]["acc,none"] == got["results"]["llama_jax_tiny_mc"]["acc,none"]
    logged = log_tensorboard(got, str(tmp_path / "tb"), step=7)
    assert tensorboard_scalars(tmp_path / "tb") == pytest.approx(
        {(f"lm_eval/{name}", 7): value for name, value in logged.items()}) and logged == scalars(got)


def test_cli(dirs, offline, tmp_path, capsys):
    from llama_jax.eval.__main__ import main

    out = tmp_path / "r.json"
    assert main(["--checkpoint", dirs[1], "--tasks", "llama_jax_tiny_mc,llama_jax_tiny_ppl", "--limit", "2",
                 "--batch-size", "4", "--include-path", TASKS_DIR, "--output", str(out), "--log-dir",
                 str(tmp_path / "tb"), "--bootstrap-iters", "0"]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"llama_jax_tiny_mc", "llama_jax_tiny_ppl"}
    assert 0 <= results["llama_jax_tiny_mc"]["acc,none"] <= 1
    assert results["llama_jax_tiny_ppl"]["word_perplexity,none"] > 1
    assert "llama_jax_tiny_mc" in capsys.readouterr().out and os.listdir(tmp_path / "tb")


def test_training_run_evaluates_its_tasks_at_the_end(offline, tmp_path):
    from test_data import corpus_dir

    from llama_jax.training import loop as trainer
    from llama_jax.training import run_config

    base = [f"workdir={tmp_path}/run", f"data.path={corpus_dir()}", "model.preset=tiny", "model.vocab_size=512",
            "batch_size=8", "seq_len=32", "steps=2", "eval_every=0", "sample_tokens=0", "checkpoint_every=2",
            f"eval_include_path={TASKS_DIR}"]
    trainer.train(run_config.build("", base + ["eval_tasks=llama_jax_tiny_mc", "eval_limit=2"]), progress=False,
                  export=False)
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert results["n-samples"]["llama_jax_tiny_mc"]["effective"] == 2
    assert 0 <= results["results"]["llama_jax_tiny_mc"]["acc,none"] <= 1
    logged = tensorboard_scalars(tmp_path / "run" / "tensorboard")
    assert logged[("lm_eval/llama_jax_tiny_mc/acc", 2)] == results["results"]["llama_jax_tiny_mc"]["acc,none"]
    assert ("train/loss", 2) in logged  # beside the run's own metrics
