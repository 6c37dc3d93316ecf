"""The sampling engine: cached greedy decoding against the full forward pass and against transformers'
generate, ragged batches, strategies, stops, bucketing, a mesh, int8, the Sampler API and the CLI."""

import io
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_util import make_hf_model
from llama_jax import Llama, LlamaConfig, Sampler, init_params
from llama_jax.errors import SamplingError
from llama_jax.model import spec
from llama_jax.model.quantize import QArray, quantize_params, tree_bytes
from llama_jax.sampling import (Greedy, Sample, Temperature, TopK, TopP, bucket, decode_continuation, generate_ids,
                                make_strategy, resolve_strategy)
from llama_jax.sampling.program import _generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[1, 5, 9, 200, 3, 17, 44], [1, 7], [1, 30, 31, 32, 33]]


@pytest.fixture(scope="module")
def tiny():
    # large init: sharp attention and peaked logits, so a wrong position or mask changes the tokens
    cfg = LlamaConfig.from_preset("tiny", initializer_range=0.2)
    return cfg, init_params(cfg, jax.random.PRNGKey(0))


def full_forward_greedy(cfg, params, prompt, n):
    """Reference: re-run the whole sequence without a cache and take the argmax, n times."""
    # one fixed-length buffer (causal: the zeros after position i cannot change its logits), one compile
    fwd = jax.jit(lambda t, i: Llama(cfg).apply({"params": params}, t, logits_at=i)[0, 0])
    buf = np.zeros((1, 32), np.int32)
    buf[0, :len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + n):
        buf[0, i] = int(jnp.argmax(fwd(jnp.asarray(buf), jnp.asarray([i - 1]))))
    return buf[0, len(prompt):len(prompt) + n].tolist()


def test_greedy_with_cache_equals_full_forward_argmax_and_ragged_batch(tiny):
    cfg, params = tiny
    batch = generate_ids(params, cfg, PROMPTS, max_new_tokens=8)
    for prompt, got in zip(PROMPTS, batch):
        assert got == full_forward_greedy(cfg, params, prompt, 8)
        assert generate_ids(params, cfg, [prompt], max_new_tokens=8) == [got]  # alone == in the batch


def hf_to_params(model, cfg):
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    flat = {}
    for p in spec.params(cfg):
        layers = range(cfg.num_layers) if p.stacked else [None]
        ws = [p.from_hf(sd[p.hf_name(i)], cfg) for i in layers]
        flat[p.path] = jnp.asarray(np.stack(ws) if p.stacked else ws[0])
    params = spec.nest(flat.items())
    return params


def test_greedy_equals_transformers_generate():
    import torch

    cfg = LlamaConfig.from_preset("tiny", initializer_range=0.2)  # sharp, as the `tiny` fixture
    model = make_hf_model(cfg, seed=1)
    params = hf_to_params(model, cfg)
    prompts = [[1, 50, 60, 70, 80, 90], [1, 200, 10], [1, 2, 3, 4]]
    ours = generate_ids(params, cfg, prompts, max_new_tokens=8, stop_ids=())
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                 pad_token_id=0)
        assert got == ref[0, len(prompt):].tolist()
    assert len(set(map(tuple, ours))) == 3


def test_strategies(tiny):
    cfg, params = tiny
    greedy = generate_ids(params, cfg, PROMPTS, max_new_tokens=8)
    sampled = lambda s, seed: generate_ids(params, cfg, PROMPTS, max_new_tokens=8, strategy=s, seed=seed)  # noqa
    s = make_strategy(temperature=1.5, top_k=50, top_p=0.95)
    assert s == Sample((Temperature(1.5), TopK(50), TopP(0.95)))
    size = _generate._cache_size()
    assert sampled(s, 7) == sampled(s, 7)  # fixed seed: reproducible
    assert sampled(s, 7) != sampled(s, 8) and sampled(s, 7) != greedy
    assert sampled(make_strategy(1.5, top_k=1), 7) == greedy  # top-k=1 is greedy
    assert sampled(make_strategy(1.5, top_p=1e-6), 3) == greedy  # a tiny nucleus is the top token
    assert _generate._cache_size() == size + 1  # new temperature / k / p values: one compiled program
    assert make_strategy(0) == Greedy()
    # the filters themselves, on a known distribution
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    assert (np.asarray(TopK(2)(logits)) > -1e29).tolist() == [[True, True, False, False]]
    kept = np.asarray(TopP(0.7)(logits)) > -1e29
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.5+0.3 reaches it
    with pytest.raises(SamplingError, match="top_p=1.5"):
        make_strategy(1.0, top_p=1.5)
    # knobs over a caller's defaults, or a strategy object as given; not both, and no unknown knob
    assert resolve_strategy(None, {"top_k": 5}, {"temperature": 0.6}) == make_strategy(0.6, top_k=5)
    assert resolve_strategy(s, {}) is s
    with pytest.raises(SamplingError, match="give one or the other"):
        resolve_strategy(s, {"temperature": 0})
    with pytest.raises(SamplingError, match="unknown sampling knob.*min_q"):
        resolve_strategy(None, {"min_q": 0.1})


def test_per_sequence_stop_and_bucketing(tiny):
    cfg, params = tiny
    greedy = generate_ids(params, cfg, PROMPTS, max_new_tokens=12)
    stop = greedy[0][4]
    assert stop not in greedy[0][:4]
    out = generate_ids(params, cfg, PROMPTS, max_new_tokens=12, stop_ids=[stop])
    for g, o in zip(greedy, out):
        cut = g.index(stop) if stop in g else len(g)
        assert o == g[:cut]
    assert out[0] == greedy[0][:4]
    # a new prompt length or max_new_tokens within the same buckets reuses the compiled program
    size = _generate._cache_size()
    generate_ids(params, cfg, [p + [4] for p in PROMPTS], max_new_tokens=11, stop_ids=[stop])
    assert _generate._cache_size() == size
    assert [bucket(n) for n in (1, 8, 9, 500, 513, 1100)] == [8, 8, 16, 512, 1024, 1536]


@pytest.mark.parametrize("mesh_shape", [(1, 2, 2)])
def test_mesh_gives_single_device_tokens(tiny, mesh_shape):
    from jax.sharding import PartitionSpec as P

    from llama_jax.cpu.decode_layout import unstack_layers
    from llama_jax.sampling import kv_cache_sharding
    from llama_jax.parallel.sharding import make_mesh, param_shardings

    cfg, params = tiny
    mesh = make_mesh(*mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
    sharded = jax.device_put(params, param_shardings(cfg, mesh))
    s = make_strategy(1.5, top_k=20)
    for strategy in (Greedy(), s):
        expected = generate_ids(params, cfg, PROMPTS, max_new_tokens=8, strategy=strategy, seed=1)
        assert generate_ids(sharded, cfg, PROMPTS, max_new_tokens=8, strategy=strategy, seed=1,
                            mesh=mesh) == expected
    shardings = kv_cache_sharding(cfg, mesh, 4, 16)  # k [L, B, K, H, S], v [L, B, K, S, H]
    assert shardings["k"].spec == shardings["v"].spec == P(None, "fsdp", "tensor", None, None)
    assert kv_cache_sharding(cfg, mesh, 4, 16, per_layer=True)["v"].spec == P("fsdp", "tensor", None, None)
    assert kv_cache_sharding(cfg, mesh, 1, 16, per_layer=True)["k"].spec == P("tensor", None, None)  # [K, H, S]
    unstacked = unstack_layers(sharded)  # per-layer weights and cache on a mesh, batch 1 and 2
    for prompts in (PROMPTS[:1], PROMPTS[:2]):
        assert generate_ids(unstacked, cfg, prompts, max_new_tokens=6, mesh=mesh) == \
            generate_ids(params, cfg, prompts, max_new_tokens=6)
    q = quantize_params(sharded, param_shardings(cfg, mesh))
    assert q["layers"]["attn"]["q"].q.sharding.spec == sharded["layers"]["attn"]["q"].sharding.spec
    assert q["layers"]["mlp"]["down"].scale.shape == (cfg.num_layers, 1, cfg.hidden_size)


def test_int8_halves_memory_and_bounds_logits(tiny):
    from llama_jax.model.transformer import param_shapes

    cfg, sharp = tiny
    # weights at the usual init scale (0.02): the sharp test model amplifies any perturbation chaotically
    f32 = jax.tree_util.tree_map_with_path(lambda p, x: x if "norm" in jax.tree_util.keystr(p) else x * 0.1, sharp)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), f32)
    q = quantize_params(bf16)
    assert isinstance(q["layers"]["mlp"]["down"], QArray) and q["layers"]["mlp"]["down"].dtype == jnp.int8
    assert tree_bytes(q) < 0.65 * tree_bytes(bf16)  # tiny: the bf16 embedding is a quarter of the model
    big = LlamaConfig.from_preset("llama2-7b", param_dtype="bfloat16")
    ratio = tree_bytes(jax.eval_shape(quantize_params, param_shapes(big))) / tree_bytes(param_shapes(big))
    assert 0.5 < ratio < 0.52, ratio  # a real model: int8 + scales, embedding in bf16

    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 16)))
    ref = Llama(cfg).apply({"params": f32}, tokens)
    got = Llama(cfg).apply({"params": quantize_params(f32)}, tokens)
    rel = float(jnp.sqrt(jnp.mean((got - ref) ** 2) / jnp.mean(ref ** 2)))
    assert 0 < rel < 0.02, rel
    assert float(jnp.max(jnp.abs(got - ref))) < 0.1 * float(jnp.std(ref))


def test_bad_input_is_clear(tiny):
    cfg, params = tiny
    with pytest.raises(SamplingError, match="prompt 1 is empty"):
        generate_ids(params, cfg, [[1], []])
    with pytest.raises(ValueError, match=f"context of {cfg.max_position_embeddings}"):
        generate_ids(params, cfg, [[1] * cfg.max_position_embeddings])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate_ids(params, cfg, [[1, cfg.vocab_size]])
    with pytest.raises(ValueError, match="not a directory"):
        Sampler.load("/nonexistent/checkpoint")


# ---- the Sampler API and the CLI on a checkpoint directory -------------------------------------------------
def write_tiny_checkpoint(directory, vocab_size=256, seed=0):
    """A Hugging Face directory: a random tiny Llama (save_pretrained) + a SentencePiece tokenizer trained here."""
    import sentencepiece as spm

    rng = np.random.RandomState(seed)
    words = "the a fox dog runs jumps over under lazy quick brown red hat cat sat on mat".split()
    lines = [" ".join(rng.choice(words, rng.randint(3, 9))) for _ in range(300)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size // 2,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    cfg = LlamaConfig.from_preset("tiny", vocab_size=vocab_size)
    make_hf_model(cfg, seed=seed).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_hf")))


def test_sampler_api(tiny_hf_dir):
    sampler = Sampler.load(tiny_hf_dir)
    texts = sampler.generate(["the quick fox", "a cat"], max_new_tokens=8, temperature=0)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert sampler.generate(["the quick fox", "a cat"], 8, strategy=Greedy()) == texts  # a strategy object
    ids = [sampler.encode("the quick fox"), sampler.encode("a cat")]
    out = sampler.generate_ids(ids, 8, temperature=0)
    # completions are decoded as they read after the prompt (a leading space is kept)
    assert [decode_continuation(sampler.tokenizer, i[-1:], o) for i, o in zip(ids, out)] == texts
    pieces = []
    streamed = sampler.generate("the quick fox", max_new_tokens=8, temperature=0, stream=pieces.append)
    assert "".join(pieces) == streamed == texts[0] and len(pieces) > 1
    reply = sampler.chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "the dog?"}],
                         max_new_tokens=5, seed=1)
    assert isinstance(reply, str)
    int8 = Sampler.load(tiny_hf_dir, int8=True)
    assert isinstance(int8.params["layers_0"]["attn"]["qkv"], QArray)  # per-layer and fused on a CPU
    assert isinstance(int8.generate("the quick fox", max_new_tokens=4), str)
    with pytest.raises(SamplingError, match="empty"):
        sampler.generate([""])
    small = sampler.config.replace(vocab_size=64)
    with pytest.raises(ValueError, match="has 128 tokens but the model's vocabulary has only 64"):
        Sampler(small, sampler.params, sampler.tokenizer)


def test_cli(tiny_hf_dir, tmp_path, capsys):
    import sample

    assert sample.main(["--checkpoint", tiny_hf_dir, "--prompt", "the quick", "--max-new-tokens", "6",
                        "--temperature", "0"]) == 0
    expected = Sampler.load(tiny_hf_dir).generate("the quick", max_new_tokens=6, temperature=0)
    assert capsys.readouterr().out == "the quick" + expected + "\n"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the dog\n\na red hat\n")
    assert sample.main(["--checkpoint", tiny_hf_dir, "--prompts-file", str(prompts), "--chat", "--system", "brief",
                        "--max-new-tokens", "4", "--top-k", "5", "--seed", "3"]) == 0
    assert capsys.readouterr().out.count("### ") == 2
    assert sample.main(["--checkpoint", tiny_hf_dir, "--prompt", ""]) == 1
    assert "empty" in capsys.readouterr().err
    assert sample.main(["--checkpoint", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    # the script itself, with no arguments, where no `python train.py` has run
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "run `python train.py` first" in r.stderr and "Traceback" not in r.stderr
