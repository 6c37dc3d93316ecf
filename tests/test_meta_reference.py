"""Meta's original checkpoints against Meta's own reference model (`llama_models/llama3/model.py`, fairscale model
parallel of size 1 on CPU): its state dict, saved whole and split into 2 and 4 model-parallel shards the way its
parallel layers cut them (Llama 3: the embedding by vocabulary; Llama 2: by model dimension), converts to
weights that give Meta's logits."""

import json
import os

import jax
import numpy as np
import pytest

from llama_jax import Llama, load
from llama_jax.errors import ConversionError
from llama_jax.io.convert import convert_to_llama_jax

PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256, "multiple_of": 32,
          "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": False}
# Meta's axis of each [out, in] weight its model-parallel layers cut, written out here (not read from our spec)
# so that a wrong guess in the converter fails: Column = rows (0), Row = columns (1), norms copied (None).
SPLIT = {"attention.wq": 0, "attention.wk": 0, "attention.wv": 0, "attention.wo": 1, "feed_forward.w1": 0,
         "feed_forward.w3": 0, "feed_forward.w2": 1, "output": 0, "norm": None, "attention_norm": None,
         "ffn_norm": None}


@pytest.fixture(scope="module")
def meta_model(tmp_path_factory):
    """(state dict, tokens, Meta's logits) of one tiny random llama_models Transformer, run once."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("fairscale")
    import torch.distributed as dist
    from fairscale.nn.model_parallel import initialize as fs_init
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer

    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        fs_init.initialize_model_parallel(1)
        torch.manual_seed(0)
        model = Transformer(ModelArgs(**PARAMS, max_batch_size=2, max_seq_len=32))
        with torch.no_grad():  # fairscale leaves its weights uninitialised (init_method=identity)
            for name, p in model.named_parameters():
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight")
                        else 0.08 * torch.randn_like(p))
        tokens = np.random.RandomState(0).randint(0, PARAMS["vocab_size"], (2, 24))
        logits = model(torch.as_tensor(tokens), 0).numpy()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        fs_init.destroy_model_parallel()
        dist.destroy_process_group()
    return state, tokens, logits


def _axis(name, embedding_axis):
    if name == "tok_embeddings.weight":
        return embedding_axis
    key = name.removesuffix(".weight").split(".", 2)[-1] if name.startswith("layers.") else name[:-7]
    return SPLIT[key]


def write_shards(state, directory, shards, embedding_axis, params):
    """consolidated.NN.pth files holding `state` cut into `shards` model-parallel parts."""
    import torch

    os.makedirs(directory)
    parts = [dict() for _ in range(shards)]
    for name, w in state.items():
        axis = _axis(name, embedding_axis)
        pieces = [w] * shards if axis is None else torch.chunk(w, shards, dim=axis)
        for part, piece in zip(parts, pieces):
            part[name] = piece.clone()
    for k, part in enumerate(parts):
        torch.save(part, os.path.join(directory, f"consolidated.{k:02d}.pth"))
    with open(os.path.join(directory, "params.json"), "w") as f:
        json.dump(params, f)


# (shards, the embedding's cut: 0 = Llama 3's VocabParallelEmbedding, 1 = Llama 2's ParallelEmbedding,
#  params.json's vocab_size: -1 as Llama 2 writes it, so the vocabulary comes from the shards' shapes)
LAYOUTS = [(1, 0, 256), (2, 0, 256), (4, 0, -1), (2, 1, -1), (4, 1, 256)]


@pytest.mark.parametrize("shards,embedding_axis,vocab", LAYOUTS)
def test_meta_shards_give_metas_logits(meta_model, tmp_path, shards, embedding_axis, vocab):
    state, tokens, expected = meta_model
    src = tmp_path / "meta"
    write_shards(state, str(src), shards, embedding_axis, {**PARAMS, "vocab_size": vocab})
    config, params = load(convert_to_llama_jax(src, tmp_path / "out", progress=False))
    assert (config.vocab_size, config.intermediate_size, config.num_kv_heads) == (256, 192, 2)
    ours = np.asarray(jax.jit(lambda p, t: Llama(config).apply({"params": p}, t))(params, tokens))
    np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=0)


def test_shards_that_fit_no_axis_are_refused(meta_model, tmp_path):
    state, _, _ = meta_model
    bad = dict(state)
    bad["layers.0.feed_forward.w1.weight"] = state["layers.0.feed_forward.w1.weight"][:, :40]  # 40 of 64 columns
    write_shards(bad, str(tmp_path / "meta"), 2, 0, PARAMS)
    with pytest.raises(ConversionError, match=r"consolidated\.01\.pth \('layers\.0\.feed_forward\.w1\.weight'\)"
                                              r": model-parallel shards of shapes .* along no axis"):
        convert_to_llama_jax(tmp_path / "meta", tmp_path / "out", progress=False)
