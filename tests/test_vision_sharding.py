"""Llama 3.2 Vision on a mesh of 8 CPU devices: the encoder, projector and cross layers follow the rules table
(heads over tensor, weights over fsdp); sizes that do not divide are replicated or refused as sharding.py
states; sharded logits, init and a train step equal one device's; the train step takes images and leaves the
frozen encoder and projector as they were."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from llama_jax.config import LlamaConfig
from llama_jax.model import spec
from llama_jax.parallel.sharding import MeshError, make_mesh, param_shardings, param_specs, use_mesh

CFG = LlamaConfig.from_preset("tiny-vision")
B, T = 4, 8

F, Tn = "fsdp", "tensor"
Q, O = (None, F, Tn, None), (None, Tn, None, F)  # stacked q/k/v [L, D, N, H] and o [L, N, H, D]
# Independent of sharding.py: the mesh axis of every dimension of every vision-only tensor under the rules.
EXPECTED = {
    "cross_layers/attn/q": Q, "cross_layers/attn/k": Q, "cross_layers/attn/v": Q, "cross_layers/attn/o": O,
    "cross_layers/attn/q_norm/scale": (None, None), "cross_layers/attn/k_norm/scale": (None, None),
    "cross_layers/attn_gate": (None, None), "cross_layers/mlp_gate": (None, None),
    "cross_layers/mlp/gate": (None, F, Tn), "cross_layers/mlp/up": (None, F, Tn),
    "cross_layers/mlp/down": (None, Tn, F),
    "cross_layers/attn_norm/scale": (None, None), "cross_layers/mlp_norm/scale": (None, None),
    "vision/patch_embedding": (None, None, None, F), "vision/class_embedding": (None,),
    "vision/pos_embedding/embedding": (None, F), "vision/pos_embedding/gate": (None,),
    "vision/pos_embedding/tile_embedding": (None, F),
    "vision/pre_tile_pos/embedding": (None, F), "vision/pre_tile_pos/gate": (None,),
    "vision/post_tile_pos/embedding": (None, F), "vision/post_tile_pos/gate": (None,),
    "vision/ln_pre/scale": (None,), "vision/ln_pre/bias": (None,),
    "vision/ln_post/scale": (None,), "vision/ln_post/bias": (None,),
    "projector/kernel": (Tn, F), "projector/bias": (None,),
    "embed/embedding": (Tn, F), "lm_head": (F, Tn),
}
for stack in ("vision/layers", "vision/global_layers"):
    EXPECTED.update({f"{stack}/attn/{k}": Q for k in "qkv"})
    EXPECTED.update({f"{stack}/attn/o": O, f"{stack}/mlp/fc1": (None, F, Tn), f"{stack}/mlp/fc1_bias": (None, Tn),
                     f"{stack}/mlp/fc2": (None, Tn, F), f"{stack}/mlp/fc2_bias": (None, None)})
    EXPECTED.update({f"{stack}/{n}/{k}": (None, None) for n in ("attn_norm", "mlp_norm") for k in ("scale", "bias")})
EXPECTED.update({f"vision/global_layers/{g}": (None, None) for g in ("gate_attn", "gate_ffn")})


def _leaf(tree, name):
    for key in name.split("/"):
        tree = tree[key]
    return tree


def _random_params(seed=0):
    """Random weights of every spec tensor (gates included, so cross-attention and tile embeddings count)."""
    rng = np.random.default_rng(seed)
    return spec.nest((p.path, (rng.uniform(-1, 1, p.full_shape(CFG)) if p.init in ("zeros", "gate") and
                               p.shape(CFG) == (1,) else rng.normal(0, 0.2, p.full_shape(CFG))).astype(np.float32))
                     for p in spec.params(CFG))


def _images(seed=1):
    rng = np.random.default_rng(seed)
    v = CFG.vision
    mask = np.ones((B, 1, v.max_num_tiles), np.int32)
    mask[1, :, 2:] = 0
    cross = np.repeat(mask[:, None], T, axis=1)
    cross[2, :3] = 0  # the first tokens of row 2 come before its image
    return dict(pixel_values=rng.normal(size=(B, 1, v.max_num_tiles, 3, v.image_size, v.image_size)).astype(np.float32),
                aspect_ratio_ids=np.array([[6], [2], [6], [1]], np.int32), aspect_ratio_mask=mask,
                cross_attention_mask=cross)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(data=2, fsdp=2, tensor=2)


def test_every_vision_tensor_is_placed_by_the_rules(mesh):
    shardings = param_shardings(CFG, mesh)
    assert {p.name for p in spec.params(CFG)} >= set(EXPECTED)
    for name, axes in EXPECTED.items():
        assert _leaf(shardings, name).spec == PartitionSpec(*axes), name


def test_sizes_that_do_not_divide_are_replicated_or_refused_as_stated():
    config = LlamaConfig.from_preset("llama3.2-11b-vision")
    specs = param_specs(config, {"data": 1, "fsdp": 1, "tensor": 16})
    # vocab + 8 image rows = 128264 = 8 x 16033: the embedding's rows stay whole, the head's 128256 split
    assert specs["embed"]["embedding"] == PartitionSpec(None, None)
    assert specs["lm_head"] == PartitionSpec(None, "tensor")
    assert specs["layers"]["attn"]["k"] == PartitionSpec(None, None, None, None)  # 8 KV heads: replicated
    assert specs["vision"]["pos_embedding"]["tile_embedding"] == PartitionSpec(None, None)
    assert param_specs(config, {"fsdp": 256})["vision"]["layers"]["attn"]["q"] == PartitionSpec(None, "fsdp", None,
                                                                                                   None)
    with pytest.raises(MeshError, match=r"vision/.*'embed(_out)?' of size 1280 cannot be split over mesh axis fsdp "
                                        r"of size 512"):
        param_specs(config, {"fsdp": 512})
    with pytest.raises(MeshError, match=r"'heads' of size 16 cannot be split over mesh axis tensor of size 32"):
        param_specs(config.replace(num_heads=64, num_kv_heads=8, head_dim=64), {"tensor": 32})


def test_sharded_logits_equal_one_device(mesh):
    from llama_jax.model.mllama import VisionLlama

    params, images = _random_params(), _images()
    tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    tokens[:, 3] = CFG.image_token_id
    forward = lambda p, t, im: VisionLlama(CFG).apply({"params": p}, t, **im)  # noqa: E731
    want = np.asarray(jax.jit(forward)(params, tokens, images))
    placed = jax.device_put(params, param_shardings(CFG, mesh))
    with use_mesh(mesh):
        got = jax.jit(forward)(placed, tokens, images)
    assert len(got.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)
    no_image = np.asarray(jax.jit(forward)(params, tokens, {}))
    assert np.abs(want - no_image).max() > 1e-2  # the images (and the gates) matter


@pytest.mark.slow
def test_sharded_init_equals_unsharded_init(mesh):
    from llama_jax.model.mllama import init_params
    from llama_jax.parallel.sharding import init_sharded_params

    params = init_sharded_params(CFG, mesh, jax.random.PRNGKey(0))
    assert _leaf(params, "vision/layers/attn/q").sharding.spec == PartitionSpec(*Q)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), init_params(CFG, jax.random.PRNGKey(0)))


@pytest.mark.slow
def test_train_step_with_images_trains_the_text_side_only(mesh):
    from llama_jax.training import step as ts
    from llama_jax.training.optim import freeze_image_encoder, make_optimizer

    optimizer = freeze_image_encoder(make_optimizer(1e-2, eps=1e-3))
    params = _random_params()
    tokens = np.random.default_rng(3).integers(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
    tokens[:, 2] = CFG.image_token_id
    batch = {"tokens": tokens, **_images()}
    batch["cross_attention_mask"] = np.concatenate([batch["cross_attention_mask"]] * 2, 1)[:, :T + 1]
    shardings = ts.state_shardings(CFG, optimizer, mesh)
    state = ts.init_train_state(jax.device_put(params, shardings.params), optimizer, shardings)
    step = ts.make_train_step(CFG, optimizer, mesh, shardings=shardings, donate=False)
    new, metrics = step(state, batch)
    new = jax.device_get(new.params)
    want = float(jax.jit(lambda p, b: ts.loss_fn(p, b, CFG)[0])(params, batch))  # one device
    assert np.isfinite(want) and abs(float(metrics["loss"]) - want) < 1e-5
    for name in ("vision/layers/attn/q", "vision/patch_embedding", "projector/kernel"):
        np.testing.assert_array_equal(_leaf(new, name), _leaf(params, name))  # frozen
    for name in ("cross_layers/attn/q", "cross_layers/attn_gate", "layers/mlp/up", "embed/embedding"):
        assert np.abs(_leaf(new, name) - _leaf(params, name)).max() > 1e-4, name  # trained
    # the Adam moments exist for the text side only
    state = jax.eval_shape(optimizer.init, params)
    sizes = sum(x.size for x in jax.tree.leaves(state))
    text = sum(x.size for k, v in params.items() if k not in ("vision", "projector") for x in jax.tree.leaves(v))
    assert sizes < 2 * text + 100


@pytest.mark.slow
def test_aot_train_step_and_sampler_with_images_compile_for_a_tpu_slice():
    """The AOT paths of configs/llama3.2-11b-vision.py and `sample.py --aot`, on tiny-vision: the train step
    with a 4-tile image per row, and the prefill with an image (its keys/values in the cache) + a decode step."""
    pytest.importorskip("libtpu")
    from llama_jax.aot.sample_report import compile_sample
    from llama_jax.aot.train_report import compile_train
    from llama_jax.training import run_config

    import os

    recipe = os.path.join(os.path.dirname(__file__), "..", "configs", "llama3.2-11b-vision.py")
    cfg = run_config.build(recipe,
                           ["model.preset=tiny-vision", "batch_size=4", "seq_len=64", "grad_accum=1"])
    report = compile_train(cfg, "v5e:2x2")
    assert report.fits and report.compiled.inputs["batch"] > 4 * 4 * 3 * 28 * 28 * 4 // 4  # the pixels per chip
    sample = compile_sample("tiny-vision", "v5e:1x1", context=256, prompt=64)
    assert sample.fits and sample.decode_attention == "xla"
