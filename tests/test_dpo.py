"""DPO: preference records -> pair token files with reply masks; the loss equals a hand computation from two
forward passes (policy and frozen reference); a few LoRA steps raise the reward margin on a toy preference
set; the reference stays the frozen base; a resumed run continues exactly."""

import functools
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_data import corpus_dir

from llama_jax import LlamaConfig, init_params
from llama_jax.model.transformer import Llama
from llama_jax.training import data, dpo, preference_data, run_config
from llama_jax.training import loop as trainer
from llama_jax.training.export import export_params
from llama_jax.training.metrics import read_jsonl
from llama_jax.training.step import split_batch

COLORS = ["red", "blue", "green", "black", "white", "brown", "pink", "gray"]


def _records(n=16):
    """A toy preference set: the chosen reply repeats the prompt's word, the rejected one says 'no'."""
    out = []
    for i in range(n):
        c = COLORS[i % len(COLORS)]
        if i % 2:
            out.append({"prompt": f"Say {c}.", "chosen": f"{c} {c}.", "rejected": "no."})
        else:
            out.append({"messages": [{"role": "user", "content": f"Say {c}."}],
                        "chosen": {"role": "assistant", "content": f"{c} {c}."}, "rejected": "no."})
    return out


@pytest.fixture(scope="module")
def pref_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    src = root / "prefs.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in _records()) + "\n")
    out = root / "tokens"
    data.main(["prepare", "--tokenizer", os.path.join(corpus_dir(), "tokenizer.model"), "--out", str(out),
               "--val-every", "4", str(src)])
    return str(out)


def test_prepare_writes_pairs_with_reply_masks(pref_dir):
    meta = data.read_meta(pref_dir)
    assert meta["kind"] == "preference" and meta["splits"]["train"]["pairs"] == 12
    assert meta["splits"]["val"]["pairs"] == 4
    tok = data.load_text_tokenizer(pref_dir)
    src = preference_data.PreferencePairs(pref_dir, "train", 48)
    recs = [r for i, r in enumerate(_records()) if i % 4 != 3]
    for i in (0, 1):
        pair = src[i]
        for side, want in ((0, recs[i]["chosen"]), (1, recs[i]["rejected"])):
            want = want["content"] if isinstance(want, dict) else want
            targets = pair["targets"][side][pair["loss_mask"][side] > 0]
            assert int(targets[-1]) == tok.eos_id  # the reply's end is scored
            assert tok.decode([int(t) for t in targets[:-1]]).strip() == want
            assert pair["segment_ids"][side].sum() > 0 and (pair["loss_mask"][side] <= pair["segment_ids"][side]).all()


def test_sft_refuses_preference_data_and_dpo_refuses_plain_data(pref_dir):
    with pytest.raises(trainer.TrainError, match="objective=dpo"):
        trainer.train(run_config.build("", [f"data.path={pref_dir}", "model.preset=tiny", "model.vocab_size=512",
                                            "seq_len=32", "batch_size=4"]), progress=False)
    with pytest.raises(trainer.TrainError, match="not preference data"):
        trainer.train(run_config.build("", [f"data.path={corpus_dir()}", "model.preset=tiny", "objective=dpo",
                                            "model.vocab_size=512", "seq_len=32", "batch_size=4"]), progress=False)


def _row_logps(params, config, batch, row):
    """log p(reply | prompt) of one row, from its own forward pass (numpy sum over the masked targets)."""
    logits = _forward(config)(params, batch["inputs"][row:row + 1])[0]  # [T, V]
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), np.float64)
    t = np.asarray(batch["targets"][row])
    return float(np.sum(logp[np.arange(len(t)), t] * np.asarray(batch["loss_mask"][row])))


@functools.lru_cache(maxsize=None)
def _forward(config):
    return jax.jit(lambda p, x: Llama(config).apply({"params": p}, x))


def test_loss_equals_a_hand_computation_from_policy_and_reference(pref_dir):
    config = LlamaConfig.from_preset("tiny", vocab_size=512)
    reference = init_params(config, jax.random.PRNGKey(0))
    policy = jax.tree.map(lambda w, k: w + 0.02 * jax.random.normal(k, w.shape), reference,
                          jax.tree.unflatten(jax.tree.structure(reference),
                                             list(jax.random.split(jax.random.PRNGKey(1), len(jax.tree.leaves(reference))))))
    batch = next(iter(preference_data.make_dataset(pref_dir, "train", 40, 4, seed=0)))
    beta = 0.5
    total, pairs, extra = jax.jit(dpo.DPO(config, beta).sums)(policy, reference, split_batch(jax.tree.map(jnp.asarray, batch)))

    pol = [_row_logps(policy, config, batch, r) for r in range(4)]
    ref = [_row_logps(reference, config, batch, r) for r in range(4)]
    losses, margins = [], []
    for p in range(2):
        margin = beta * ((pol[2 * p] - ref[2 * p]) - (pol[2 * p + 1] - ref[2 * p + 1]))
        losses.append(math.log1p(math.exp(-margin)))  # -log sigmoid(margin)
        margins.append(margin)
    assert float(pairs) == 2
    np.testing.assert_allclose(float(total), sum(losses), rtol=1e-5)
    np.testing.assert_allclose(float(extra["reward_margin"]), sum(margins), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(extra["logps_chosen"]), pol[0] + pol[2], rtol=1e-5)
    np.testing.assert_allclose(float(extra["logps_rejected"]), pol[1] + pol[3], rtol=1e-5)
    assert float(extra["reward_accuracy"]) == sum(m > 0 for m in margins)
    assert abs(sum(margins)) > 1e-3  # the policy differs from the reference, so the check has teeth


def _dpo_cfg(tmp_path, pref_dir, base_dir, *extra):
    return run_config.build("", [f"workdir={tmp_path}/dpo", f"init_from={base_dir}", f"data.path={pref_dir}",
                                 "objective=dpo", "dpo.beta=0.5", "batch_size=8", "seq_len=40", "steps=6",
                                 "optim.lr=2e-2", "optim.warmup_steps=1", "optim.weight_decay=0", "eval_every=3",
                                 "eval_batches=1", "sample_tokens=0", "checkpoint_every=3", "lora.rank=4",
                                 "lora.alpha=8", "lora.targets=q,v,o,down", "grad_accum=2", "mesh.fsdp=4",
                                 "mesh.tensor=2", *extra])


def test_dpo_lora_raises_the_margin_keeps_the_reference_and_resumes_exactly(tmp_path, pref_dir):
    config = LlamaConfig.from_preset("tiny", vocab_size=512)
    base = init_params(config, jax.random.PRNGKey(7))
    base_dir = export_params(str(tmp_path / "base"), config, base, pref_dir)
    cfg = _dpo_cfg(tmp_path, pref_dir, base_dir)
    result = trainer.train(cfg, progress=False, export=False)

    rows = [r for r in read_jsonl(os.path.join(cfg.workdir, "metrics.jsonl")) if "reward_margin" in r]
    first, last = rows[0], rows[-1]
    # step 1 runs the base (B = 0): policy == reference, so margin 0 and loss log 2 exactly
    assert abs(first["reward_margin"]) < 1e-6 and abs(first["loss"] - math.log(2)) < 1e-6
    assert last["reward_margin"] > 0.05 and last["reward_accuracy"] == 1.0 and last["loss"] < math.log(2)
    assert all(k in last for k in ("logps_chosen", "logps_rejected", "reward_chosen", "reward_rejected"))
    # the reference is the frozen base, untouched
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(result.state.frozen), jax.device_get(base))

    # resume: drop the last checkpoint, run again -> steps 4..6 and the adapters equal the uninterrupted run
    shutil.rmtree(os.path.join(cfg.workdir, "checkpoints", "6"))
    resumed = trainer.train(cfg, progress=False, export=False)
    assert [l for s, l in resumed.losses] == [l for s, l in result.losses if s > 3]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state.params),
                 jax.device_get(result.state.params))
