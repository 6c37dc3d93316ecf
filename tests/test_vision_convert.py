"""Llama 3.2 Vision (Mllama) checkpoints in and out: a transformers-saved tiny Mllama (sharded, with an index,
random gates) converts to llama_jax with every tensor in its place (self and cross layers numbered together in
the file, apart in our tree), loads with `llama_jax.load` (converted or straight from the HF directory, on one
device or a mesh), and `--to-hf` writes it back bit for bit, loadable by MllamaForConditionalGeneration with the
same logits; the tokenizer and preprocessing files travel with it."""

import json

import numpy as np
import pytest

from llama_jax.config import LlamaConfig
from llama_jax.model import spec

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# tiny-vision with its cross layer moved to HF index 2 (self layers 0, 1, 3): a self layer sits after it, so
# a stack that forgot the interleaving reads the wrong file layer. GQA (4 heads over 2 KV heads).
CFG = LlamaConfig.from_preset("tiny-vision", num_layers=3, cross_attention_layers=(2,))
PREPROCESSOR = {"image_processor_type": "MllamaImageProcessor", "max_image_tiles": 4,
                "size": {"height": 28, "width": 28}, "do_normalize": True}


def _files(directory):
    from safetensors import safe_open

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as g:
            out.update({k: g.get_tensor(k) for k in g.keys()})
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """transformers' own save_pretrained of a random tiny Mllama, in small shards with an index."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(MllamaConfig(**CFG.to_hf_dict())).eval()
    with torch.no_grad():  # transformers starts every gate at zero: a zero gate hides a misplaced tensor
        for name, p in model.named_parameters():
            if "gate" in name and p.numel() == 1:  # cross-attention, tile/position and global-layer gates
                torch.nn.init.uniform_(p, -1, 1)
    directory = tmp_path_factory.mktemp("hf") / "mllama"
    model.save_pretrained(directory, max_shard_size="100KB")
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>"}))
    return directory, model


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    from llama_jax.io.convert import main

    dst = tmp_path_factory.mktemp("ours") / "ckpt"
    assert main([str(hf_dir[0]), str(dst), "--no-progress"]) == 0
    return dst


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG.vocab_size, (2, 7), generator=g)
    ids[:, 1] = CFG.image_token_id
    return dict(input_ids=ids, pixel_values=torch.randn(2, 1, 4, 3, 28, 28, generator=g),
                aspect_ratio_ids=torch.tensor([[6], [2]]),  # 2x2 tiles; 1x2 tiles (two tiles masked)
                aspect_ratio_mask=torch.tensor([[[1, 1, 1, 1]], [[1, 1, 0, 0]]]),
                cross_attention_mask=torch.tensor([[[[1, 1, 1, 1]]] * 7, [[[1, 1, 0, 0]]] * 7]))


def test_the_index_is_sharded_and_every_tensor_lands_in_its_place(hf_dir, converted):
    import llama_jax

    directory, _ = hf_dir
    assert len(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]) > 100
    assert len(list(directory.glob("model-*.safetensors"))) > 3
    config, params = llama_jax.load(str(converted))
    assert config.vision == CFG.vision and config.cross_attention_layers == (2,)
    files = _files(directory)
    for p in spec.params(config):
        leaf = params
        for key in p.path:
            leaf = leaf[key]
        leaf = np.asarray(leaf)
        assert leaf.shape == p.full_shape(config), p.name
        for i, hf_i in enumerate(p.hf_layers(config)):
            want = p.from_hf(files[p.hf_name(hf_i)].numpy(), config)
            np.testing.assert_array_equal(leaf[i] if p.stacked else leaf, want, err_msg=p.name)
    # our self layer 2 is the file's layer 3 (the cross layer is 2)
    np.testing.assert_array_equal(np.asarray(params["layers"]["mlp_norm"]["scale"][2]),
                                  files["language_model.model.layers.3.post_attention_layernorm.weight"].numpy())
    for name in ("preprocessor_config.json", "chat_template.json", "tokenizer_config.json"):
        assert (converted / name).read_text() == (directory / name).read_text()


def test_load_straight_from_the_hf_directory_on_a_mesh(hf_dir, converted):
    import jax
    from jax.sharding import PartitionSpec

    import llama_jax
    from llama_jax.parallel.sharding import make_mesh

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    config, params = llama_jax.load(str(hf_dir[0]), mesh=mesh)
    _, want = llama_jax.load(str(converted))
    assert params["cross_layers"]["attn"]["q"].sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    assert params["vision"]["layers"]["attn"]["q"].sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(want))


def test_to_hf_round_trip_is_bit_exact_and_transformers_gives_the_same_logits(hf_dir, converted, tmp_path):
    from transformers import MllamaForConditionalGeneration

    from llama_jax.io.convert import main

    directory, model = hf_dir
    back = tmp_path / "back"
    assert main(["--to-hf", str(converted), str(back), "--no-progress", "--max-shard-size", "200KB"]) == 0
    original, exported = _files(directory), _files(back)
    assert set(original) == set(exported)
    for name, tensor in original.items():
        assert torch.equal(tensor, exported[name]), name
    index = json.loads((back / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(original)
    for name in ("preprocessor_config.json", "chat_template.json"):
        assert (back / name).read_text() == (directory / name).read_text()
    reloaded = MllamaForConditionalGeneration.from_pretrained(back).eval()
    with torch.no_grad():
        want, got = model(**_inputs()).logits, reloaded(**_inputs()).logits
        text_only = reloaded(input_ids=_inputs()["input_ids"][:, 2:]).logits
    assert torch.equal(want, got)
    assert torch.isfinite(text_only).all()


@pytest.mark.slow
def test_our_forward_on_the_converted_checkpoint_equals_transformers(hf_dir, converted):
    """End to end through the converter (the model's own parity tests build params from HF tensors directly)."""
    import llama_jax
    from llama_jax.model.mllama import VisionLlama

    config, params = llama_jax.load(str(converted))
    inputs = _inputs()
    with torch.no_grad():
        want = hf_dir[1](**inputs).logits.numpy()
    got = VisionLlama(config).apply({"params": params}, inputs["input_ids"].numpy(),
                                    **{k: v.numpy() for k, v in inputs.items() if k != "input_ids"})
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)
