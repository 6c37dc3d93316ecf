"""Sharded forward and train step on 8 fake CPU devices equal the single-device results on every mesh shape;
shard shapes follow the rules; meshes that cannot split the model fail clearly; per-device memory is the total
over fsdp×tensor; a checkpoint saved on one mesh restores onto another."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llama_jax import Llama, LlamaConfig, init_params
from llama_jax.training import step as ts
from llama_jax.parallel.sharding import (MeshError, make_mesh, make_rules, measured_bytes_per_device,
                                         param_bytes_per_device, param_shardings)

# 8 heads, 2 KV heads, every dimension divisible by 8, so every mesh of 8 devices can split it.
CFG = LlamaConfig.from_preset("tiny", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                              num_heads=8, num_kv_heads=2, head_dim=8)
MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (4, 1, 2)]
B, T = 16, 16
LR = 1e-3
# Adam's first update is lr * g / (|g| + eps): with a tiny eps it is ~lr * sign(g), a step function of g, so
# an ulp of float-summation-order difference (each mesh sums in its own order) in a near-zero gradient
# becomes an lr-sized difference in that parameter — a property of Adam, not of sharding. With eps=1e-8 the
# updated parameters agree to ~1e-4, with 1e-5 to ~5e-6, with 1e-3 to ~2e-7 (typical |g| here is ~3e-3, so
# the update is still Adam-like and ~1e-2 of the parameters: a sharding error in it would show).
EPS = 1e-3

# Independent of sharding.py: which mesh axis splits each dimension of each parameter under the default rules.
EXPECTED_AXES = {
    "embed/embedding": ("tensor", "fsdp"),
    "final_norm/scale": (None,),
    "layers/attn_norm/scale": (None, None),
    "layers/mlp_norm/scale": (None, None),
    "layers/attn/q": (None, "fsdp", "tensor", None),
    "layers/attn/k": (None, "fsdp", "tensor_kv", None),
    "layers/attn/v": (None, "fsdp", "tensor_kv", None),
    "layers/attn/o": (None, "tensor", None, "fsdp"),
    "layers/mlp/gate": (None, "fsdp", "tensor"),
    "layers/mlp/up": (None, "fsdp", "tensor"),
    "layers/mlp/down": (None, "tensor", "fsdp"),
    "lm_head": ("fsdp", "tensor"),
}


def _name(path):
    return "/".join(str(k.key) for k in path)


def _assert_close(actual, expected, what, rtol=1e-5):
    actual, expected = np.asarray(actual), np.asarray(expected)
    err = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30)
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


def _batch():
    rng = np.random.RandomState(0)
    inputs = rng.randint(0, CFG.vocab_size, (B, T)).astype(np.int32)
    targets = rng.randint(0, CFG.vocab_size, (B, T)).astype(np.int32)
    # Two packed documents per row (the second starts at a row-dependent place), padding at the end of
    # half the rows, and a few prompt tokens masked out of the loss.
    segment_ids = np.ones((B, T), np.int32)
    positions = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    loss_mask = np.ones((B, T), np.float32)
    for row in range(B):
        cut = 4 + row % 7
        segment_ids[row, cut:] = 2
        positions[row, cut:] = np.arange(T - cut)
        loss_mask[row, cut - 1] = 0.0  # the boundary target belongs to the next document
        loss_mask[row, :2] = 0.0  # a "prompt"
        if row % 2:
            segment_ids[row, T - 3:] = 0
            loss_mask[row, T - 3:] = 0.0
    return {"inputs": inputs, "targets": targets, "positions": positions, "segment_ids": segment_ids,
            "loss_mask": loss_mask}


def _optimizer():
    from llama_jax.training.optim import make_optimizer
    return make_optimizer(LR, eps=EPS, weight_decay=0.1, clip_norm=1.0)


@pytest.fixture(scope="module")
def params0():
    """Initial parameters as numpy (device_put from a jax.Array may alias it, and the steps donate)."""
    return jax.device_get(init_params(CFG, jax.random.PRNGKey(0)))


@pytest.fixture(scope="module")
def reference(params0):
    """Single-device results with plain jax + optax (no train_step code): logits, loss, updated params."""
    params = jax.device_put(params0, jax.devices()[0])
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}

    def loss(p):
        logits = Llama(CFG).apply({"params": p}, batch["inputs"], positions=batch["positions"],
                                  segment_ids=batch["segment_ids"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return jnp.sum(ce * batch["loss_mask"]) / jnp.sum(batch["loss_mask"]), logits

    optimizer = _optimizer()

    @jax.jit
    def step(p):
        (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(p)
        updates, _ = optimizer.update(grads, optimizer.init(p), p)
        return value, logits, optax.tree.norm(grads), optax.apply_updates(p, updates)

    value, logits, grad_norm, new_params = step(params)
    return dict(params=params0, logits=np.asarray(logits), loss=float(value),
                grad_norm=float(grad_norm), new_params=jax.device_get(new_params))


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_forward_and_step_equal_single_device(shape, reference):
    mesh = make_mesh(*shape)
    shardings = param_shardings(CFG, mesh)
    params = jax.device_put(reference["params"], shardings)
    batch = _batch()

    logits = ts.make_forward(CFG, mesh)(params, batch)
    _assert_close(logits, reference["logits"], f"logits on {shape}")

    optimizer = _optimizer()
    state_sh = ts.state_shardings(CFG, optimizer, mesh)
    state = ts.init_train_state(params, optimizer, state_sh)
    step = ts.make_train_step(CFG, optimizer, mesh, shardings=state_sh)
    new_state, metrics = step(state, batch)
    _assert_close(metrics["loss"], reference["loss"], f"loss on {shape}")
    _assert_close(metrics["grad_norm"], reference["grad_norm"], f"grad norm on {shape}")
    assert float(metrics["tokens"]) == _batch()["loss_mask"].sum()
    assert int(new_state.step) == 1
    assert params["lm_head"].is_deleted(), "the train step should donate the state's buffers"

    flat_new = jax.tree_util.tree_flatten_with_path(new_state.params)[0]
    flat_ref = dict((_name(p), v) for p, v in jax.tree_util.tree_flatten_with_path(reference["new_params"])[0])
    sizes = dict(mesh.shape)
    flat_sh = dict((_name(p), v) for p, v in jax.tree_util.tree_flatten_with_path(shardings)[0])
    for path, leaf in flat_new:
        name = _name(path)
        _assert_close(leaf, flat_ref[name], f"updated {name} on {shape}")
        # Shard shape: each dimension divided by the mesh axis the rules assign it (KV heads replicated when
        # the tensor axis is larger than their count).
        expected = []
        for dim, axis in zip(leaf.shape, EXPECTED_AXES[name]):
            if axis == "tensor_kv":
                axis = "tensor" if CFG.num_kv_heads % sizes["tensor"] == 0 else None
            expected.append(dim // sizes[axis] if axis else dim)
        assert leaf.addressable_shards[0].data.shape == tuple(expected), (name, shape)
        assert leaf.sharding.is_equivalent_to(flat_sh[name], leaf.ndim), (name, leaf.sharding, flat_sh[name])
    # Adam's moments (every optimizer-state leaf under a parameter's path) live where their parameters do.
    moments = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(new_state.opt_state)[0]
               if _name([k for k in p if isinstance(k, jax.tree_util.DictKey)]) == "layers/mlp/up"]
    assert len(moments) == 2  # mu and nu
    for _, x in moments:
        assert x.sharding.is_equivalent_to(flat_sh["layers/mlp/up"], x.ndim)


def test_shard_shapes_named_examples():
    """The examples of the issue, spelled out: on (1,8,1) the embed dimension is split 8 ways; on (1,1,8) the
    2 KV heads are replicated while the 8 query heads are split."""
    sh = param_shardings(CFG, make_mesh(1, 8, 1))
    assert sh["embed"]["embedding"].shard_shape((256, 64)) == (256, 8)
    assert sh["layers"]["mlp"]["down"].shard_shape((2, 128, 64)) == (2, 128, 8)
    sh = param_shardings(CFG, make_mesh(1, 1, 8))
    assert sh["layers"]["attn"]["k"].shard_shape((2, 64, 2, 8)) == (2, 64, 2, 8)
    assert sh["layers"]["attn"]["q"].shard_shape((2, 64, 8, 8)) == (2, 64, 1, 8)
    # Rules are data: replicating the vocabulary changes the shardings, not the model.
    sh = param_shardings(CFG, make_mesh(1, 1, 8), make_rules({"vocab": None}))
    assert sh["embed"]["embedding"].shard_shape((256, 64)) == (256, 64)


@pytest.mark.parametrize("overrides, mesh, dimension, axis", [
    (dict(num_heads=12, num_kv_heads=4), (1, 1, 8), "'heads' of size 12", "tensor of size 8"),
    (dict(intermediate_size=100), (1, 1, 8), "'mlp' of size 100", "tensor of size 8"),
    (dict(hidden_size=60), (1, 8, 1), "'embed' of size 60", "fsdp of size 8"),
    (dict(vocab_size=250), (2, 1, 4), "'vocab' of size 250", "tensor of size 4"),
])
def test_mesh_that_cannot_split_the_model_is_a_clear_error(overrides, mesh, dimension, axis):
    cfg = CFG.replace(**overrides)
    with pytest.raises(MeshError) as err:
        ts.make_train_step(cfg, _optimizer(), make_mesh(*mesh))
    assert dimension in str(err.value) and axis in str(err.value), str(err.value)


def test_bad_rules_and_mesh_sizes_are_clear_errors():
    with pytest.raises(MeshError, match="did you mean 'vocab'"):
        make_rules({"vocb": None})
    with pytest.raises(MeshError, match="unknown mesh axis"):
        make_rules({"vocab": "model"})
    with pytest.raises(MeshError, match="8 devices"):
        make_mesh(data=3, fsdp=-1)
    # A batch that does not split evenly over data×fsdp is refused before tracing.
    with pytest.raises(MeshError, match="batch size 12 is not a multiple of data×fsdp = 8"):
        ts.make_forward(CFG, make_mesh(2, 4, 1))(None, {"inputs": np.zeros((12, 16), np.int32)})


def test_make_mesh_takes_sizes_by_name_over_any_devices_and_any_declared_axes(monkeypatch):
    """One builder: sizes by position or name (defaults for the rest), any device list, valid sizes listed
    when they do not fit; an axis added to MESH_AXES is all make_mesh needs to know of it."""
    from llama_jax.parallel import sharding

    assert dict(make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(make_mesh(tensor=2).shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    four = jax.devices()[4:]
    mesh = make_mesh(1, 1, 4, devices=four)
    assert list(mesh.devices.flat) == four
    with pytest.raises(MeshError, match=r"data=1 × fsdp=3 × tensor=1 does not divide the 4 devices.*divisors "
                                        r"of 4: \[1, 2, 4\], e.g. \(data=1, fsdp=4, tensor=1\)"):
        make_mesh(fsdp=3, devices=four)
    with pytest.raises(MeshError, match=r"unknown mesh axis \['expert'\]"):
        make_mesh(expert=2)
    monkeypatch.setattr(sharding, "MESH_AXES", ("data", "fsdp", "expert", "tensor"))
    assert dict(make_mesh(expert=2, tensor=2).shape) == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}


@pytest.mark.parametrize("shape", [(1, 8, 1), (1, 4, 2), (2, 2, 2)])
def test_per_device_parameter_bytes(shape, params0):
    mesh = make_mesh(*shape)
    params = jax.device_put(params0, param_shardings(CFG, mesh))
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    measured = measured_bytes_per_device(params)
    split = shape[1] * shape[2]
    # Norm scales are replicated (a few hundred floats); everything else divides exactly.
    replicated = sum(x.nbytes for p, x in jax.tree_util.tree_flatten_with_path(params)[0] if "norm" in _name(p))
    assert len(measured) == 8 and len(set(measured.values())) == 1, measured
    per_device = next(iter(measured.values()))
    assert per_device == (total - replicated) // split + replicated
    assert per_device == param_bytes_per_device(CFG, mesh)
    assert total / split <= per_device <= 1.03 * total / split, (per_device, total / split)
    print(f"mesh {shape}: {per_device} bytes per device, total {total} / {split} = {total / split:.0f}")


def test_gradient_accumulation_equals_one_larger_batch(params0, reference):
    """k=2 micro-batches on a (2,2,2) mesh give the single-device update of the whole batch."""
    mesh = make_mesh(2, 2, 2)
    optimizer = _optimizer()
    sh = ts.state_shardings(CFG, optimizer, mesh)
    state = ts.init_train_state(jax.device_put(params0, sh.params), optimizer, sh)
    state, metrics = ts.make_train_step(CFG, optimizer, mesh, shardings=sh, accum_steps=2)(state, _batch())
    _assert_close(metrics["loss"], reference["loss"], "loss with accumulation")
    _assert_close(metrics["grad_norm"], reference["grad_norm"], "grad norm with accumulation")
    assert float(metrics["tokens"]) == _batch()["loss_mask"].sum()
    jax.tree.map(lambda a, b: _assert_close(a, b, "params after accumulation"), jax.device_get(state.params),
                 reference["new_params"])
    with pytest.raises(ValueError, match="not a multiple of accum_steps=3"):
        ts.make_train_step(CFG, optimizer, mesh, shardings=sh, accum_steps=3)(state, _batch())


def test_cross_mesh_restore(tmp_path, params0):
    """Saved on (1,8,1) (fsdp), restored with llama_jax.load onto (2,1,4) and onto one device: identical."""
    import orbax.checkpoint as ocp

    from llama_jax import load
    from llama_jax.io import checkpoint

    mesh = make_mesh(1, 8, 1)
    params = jax.device_put(params0, param_shardings(CFG, mesh))
    directory = tmp_path / "ckpt"
    with ocp.StandardCheckpointer() as ckptr:  # every process writes its own shards
        ckptr.save(str(directory / checkpoint.PARAMS_DIR), params)
    checkpoint.write_metadata(str(directory), CFG, "float32")
    expected = jax.device_get(params)

    target = make_mesh(2, 1, 4)
    cfg, restored = load(directory, mesh=target)
    assert cfg == CFG.replace(param_dtype="float32")
    want = param_shardings(CFG, target)
    jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(f"{x.sharding} != {s}"),
                 restored, want)
    assert restored["layers"]["attn"]["q"].addressable_shards[0].data.shape == (2, 64, 2, 8)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), expected)

    _, single = load(directory)
    assert len(single["lm_head"].sharding.device_set) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(single), expected)


def test_sharded_init_equals_unsharded_init(params0):
    """Parameters initialised straight into their shardings (under jit) are the unsharded ones."""
    from llama_jax.parallel.sharding import init_sharded_params

    mesh = make_mesh(2, 2, 2)
    params = init_sharded_params(CFG, mesh, jax.random.PRNGKey(0))
    want = param_shardings(CFG, mesh)
    jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(f"{x.sharding} != {s}"),
                 params, want)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), params0)


def test_loss_batch_forms_and_errors(params0):
    """`tokens` [B, T+1] is the same as inputs/targets; an all-masked batch has loss 0, not NaN; arrays of
    the wrong shape are named."""
    tokens = np.random.RandomState(3).randint(0, CFG.vocab_size, (2, 9)).astype(np.int32)
    loss = jax.jit(lambda p, b: ts.loss_fn(p, b, CFG)[0])
    a = loss(params0, {"tokens": tokens})
    b = loss(params0, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    assert float(a) == float(b) and float(a) > 0
    masked = loss(params0, {"tokens": tokens, "loss_mask": np.zeros((2, 8), np.float32)})
    assert float(masked) == 0.0
    with pytest.raises(ValueError, match="'segment_ids' has shape \\(2, 9\\), expected \\(2, 8\\)"):
        loss(params0, {"tokens": tokens, "segment_ids": np.ones((2, 9), np.int32)})
    with pytest.raises(KeyError, match="needs 'inputs' and 'targets'"):
        loss(params0, {"input_ids": tokens})
