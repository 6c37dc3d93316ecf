"""LoRA through the trainer: only adapters train, the base weights stay bit-identical, the merge is
W + (alpha/r) A @ B, the merged export gives the adapted model's logits, and the converter exports it to
Hugging Face with the same logits."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from test_data import corpus_dir

from llama_jax import LlamaConfig, init_params
from llama_jax.training import lora, run_config
from llama_jax.training import loop as trainer
from llama_jax.training.export import export_params
from llama_jax.model.transformer import Llama

TARGETS = ("q", "v", "o", "down")


def test_lora_trains_adapters_only_and_merge_exports(tmp_path):
    import llama_jax

    path = corpus_dir()
    config = LlamaConfig.from_preset("tiny", vocab_size=512)
    base = init_params(config, jax.random.PRNGKey(7))
    base_dir = export_params(str(tmp_path / "base"), config, base, path)

    cfg = run_config.build("", [f"workdir={tmp_path}/lora", f"init_from={tmp_path}/base", f"data.path={path}",
                                "batch_size=8", "seq_len=64", "steps=4", "optim.lr=1e-2", "optim.warmup_steps=1",
                                "eval_every=0", "sample_tokens=0", "checkpoint_every=2", "lora.rank=4",
                                "lora.alpha=8", f"lora.targets={','.join(TARGETS)}"])
    result = trainer.train(cfg, progress=False)
    losses = [l for _, l in result.losses]
    assert losses[-1] < losses[0]

    # the trained tree is the adapters only; the frozen base is bit-identical to the checkpoint
    adapters = jax.device_get(result.state.params)
    assert sorted(adapters["layers"]["attn"]) == ["o", "q", "v"] and sorted(adapters["layers"]["mlp"]) == ["down"]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(result.state.frozen), jax.device_get(base))
    _, reloaded_base = llama_jax.load(base_dir)
    jax.tree.map(np.testing.assert_array_equal, reloaded_base, jax.device_get(base))
    assert all(np.abs(adapters["layers"][m][k]["b"]).max() > 0 for m, k in (("attn", "q"), ("mlp", "down")))

    # the export is the merge: W + alpha/r * A @ B on the targets (numpy), untouched elsewhere
    _, merged = llama_jax.load(cfg.workdir)
    merged = jax.device_get(merged)
    scale = cfg.lora.alpha / cfg.lora.rank
    for module, name in (("attn", "q"), ("attn", "v"), ("attn", "o"), ("mlp", "down")):
        a, b = (np.asarray(adapters["layers"][module][name][x], np.float64) for x in "ab")
        w = np.asarray(base["layers"][module][name], np.float64)
        layers, r = a.shape[0], a.shape[-1]
        expected = w + scale * (a.reshape(layers, -1, r) @ b.reshape(layers, r, -1)).reshape(w.shape)
        np.testing.assert_allclose(merged["layers"][module][name], expected, atol=1e-6)
    for module, name in (("attn", "k"), ("mlp", "gate"), ("mlp", "up")):
        np.testing.assert_array_equal(merged["layers"][module][name], base["layers"][module][name])

    # merged logits == adapted logits (base + adapters applied inside the jitted forward, as in training)
    tokens = jnp.asarray(np.random.RandomState(0).randint(3, 512, (2, 24)), jnp.int32)
    adapted = jax.jit(lambda p, f, t: Llama(config).apply({"params": lora.apply_lora(f, p, cfg.lora.alpha)}, t))(
        adapters, base, tokens)
    merged_logits = Llama(config).apply({"params": merged}, tokens)
    base_logits = Llama(config).apply({"params": base}, tokens)
    np.testing.assert_allclose(merged_logits, adapted, atol=2e-5)
    assert np.abs(np.asarray(adapted) - np.asarray(base_logits)).max() > 1e-3  # the adapters changed the model

    # the converter exports the merged model to Hugging Face, which gives the same logits
    import torch
    from transformers import LlamaForCausalLM

    from llama_jax.io.convert import export_to_hf
    hf_dir = str(tmp_path / "hf")
    export_to_hf(os.path.join(cfg.workdir, "export"), hf_dir, progress=False)
    model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        hf = model(torch.tensor(np.array(tokens), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(hf, merged_logits, atol=1e-4)


def test_lora_shapes_shardings_and_zero_start():
    config = LlamaConfig.from_preset("tiny")
    shapes = lora.lora_shapes(config, 2, ("q", "o", "gate"))
    assert shapes["layers"]["attn"]["q"]["a"].shape == (2, 64, 2)
    assert shapes["layers"]["attn"]["q"]["b"].shape == (2, 2, 4, 16)
    assert shapes["layers"]["attn"]["o"]["a"].shape == (2, 4, 16, 2)
    assert shapes["layers"]["mlp"]["gate"]["b"].shape == (2, 2, 128)
    adapters = lora.init_lora(config, 2, ("q", "o", "gate"), jax.random.PRNGKey(0))
    params = init_params(config, jax.random.PRNGKey(1))
    # B = 0 at the start: the adapted model is the base model exactly
    jax.tree.map(np.testing.assert_array_equal, lora.merge(params, adapters, 16.0), params)
    from llama_jax.parallel.sharding import make_mesh
    mesh = make_mesh(1, 2, 4)
    sh = lora.lora_shardings(config, 2, ("q", "o", "gate"), mesh)
    assert sh["layers"]["attn"]["q"]["a"].spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert sh["layers"]["attn"]["q"]["b"].spec == jax.sharding.PartitionSpec(None, None, "tensor", None)
