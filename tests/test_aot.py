"""Ahead-of-time compilation for TPU slices (libtpu's compiler, no TPU): the real train step of a small config
compiled for v5e:2x2 — memory, FLOPs and collectives checked against what the config and mesh imply."""

import math

import jax
import pytest

pytest.importorskip("libtpu", reason="needs the TPU compiler wheel (requirements-test.txt: libtpu)")

from llama_jax import aot
from llama_jax.model import flops
from llama_jax.aot import hlo
from llama_jax.training import run_config  # noqa: E402
from llama_jax.model.transformer import param_shapes  # noqa: E402

TOPOLOGY = "v5e:2x2"
# small preset (vocab 2048, D 256, 4 layers), bf16 compute over f32 master weights, full remat;
# 16 sequences of 128 over fsdp=2 x tensor=2. XLA attention: the checks below count its buffers and FLOPs
# (the default, auto, would run the splash kernel on a TPU: see test_splash_attention_compiles_for_v5e).
OVERRIDES = ["model.preset=small", "model.dtype=bfloat16", "model.remat=full", "batch_size=16", "seq_len=128",
             "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "model.attention=xla"]


@pytest.fixture(scope="module")
def report():
    return aot.compile_train(run_config.build("", OVERRIDES), TOPOLOGY, "test")


def test_compiles_for_the_slice(report):
    assert report.topology.chips == 4 and len(report.topology.devices) == 4
    assert report.mesh_shape == {"data": 1, "fsdp": 2, "tensor": 2}
    assert report.fits and report.topology.hbm_bytes == 16 * 2**30
    text = aot.format_train(report)
    assert "FITS" in text and "all-gather" in text


def test_memory_matches_the_analytic_estimate(report):
    """Per-device bytes (without the program's code) within 10% of params + optimizer state + inputs + the
    largest activations: the scan's saved block inputs (full remat keeps only those) plus one layer's
    gathered bf16 weights. Donation matters here: without it the updated state would count twice."""
    cfg, c = report.config, report.compiled
    b = report.batch_size // (report.mesh_shape["data"] * report.mesh_shape["fsdp"])  # rows per device
    residuals = cfg.num_layers * b * report.seq_len * cfg.hidden_size * 2  # bf16 [L, b, T, D]
    layer = (flops.matmul_params(cfg) - cfg.hidden_size * cfg.vocab_size) // cfg.num_layers
    gathered = layer // report.mesh_shape["tensor"] * 2
    n_params = sum(math.prod(s.shape) for s in jax.tree.leaves(param_shapes(cfg)))
    # float32 (4 bytes) split over 4 devices (only the small norm scales are replicated)
    assert c.inputs["params"] == pytest.approx(n_params * 4 / 4, rel=0.01)
    assert c.inputs["opt_state"] == pytest.approx(2 * c.inputs["params"], rel=0.01)  # Adam mu + nu
    estimate = c.inputs["params"] + c.inputs["opt_state"] + c.inputs["batch"] + residuals + gathered
    measured = c.total - c.code
    assert c.alias >= c.inputs["params"] + c.inputs["opt_state"]  # the state is donated
    assert measured == pytest.approx(estimate, rel=0.10), (measured, estimate)


def test_flops_match_xla_cost_analysis(report):
    """XLA's count (a while body once: one layer) within 5% of the analytic count of that program; the
    analytic count is the MFU one (flops.train_flops_per_token) plus what the hardware also does."""
    xla, expected = report.xla_check
    assert xla == pytest.approx(expected, rel=0.05)
    cfg, t = report.config, report.seq_len
    one = cfg.replace(num_layers=1, remat="none")
    masked_half = 6 * one.num_heads * one.head_dim * t  # the causal mask hides half of a computed QK^T/PV
    assert aot.hardware_flops_per_token(one, t) == pytest.approx(flops.train_flops_per_token(one, t) + masked_half)
    assert report.flops_per_step == pytest.approx(flops.train_flops_per_token(cfg, t) * 16 * 128)


def test_collectives_follow_the_mesh(report):
    """FSDP gathers the weights and reduces the gradients along fsdp; tensor parallelism reduces activations
    along tensor and never gathers a whole matmul weight."""
    cfg, c = report.config, report.compiled
    by = {(k, a): nbytes for k, a, _, nbytes in hlo.summarize(c.collectives)}
    layer_bf16 = (flops.matmul_params(cfg) - cfg.hidden_size * cfg.vocab_size) // 2 * 2  # / tensor, x 2 bytes
    assert by.get(("all-gather", ("fsdp",)), 0) >= layer_bf16  # every layer's weights, at least once
    assert ("reduce-scatter", ("fsdp",)) in by  # gradients scattered back to their fsdp shards
    grad_reduced = by.get(("reduce-scatter", ("fsdp",)), 0) + by.get(("all-reduce", ("fsdp",)), 0)
    assert grad_reduced >= layer_bf16  # every weight's gradient is reduced over fsdp
    assert by.get(("all-reduce", ("tensor",)), 0) > 0  # row-parallel outputs (o, down) summed over tensor
    assert not any(k == "all-gather" and "data" in a for k, a in by)  # data=1: nothing on a size-1 axis
    gathers = aot.weight_gathers_over_tensor(c.collectives, cfg, report.mesh_shape)
    assert not gathers, [(name, col.shape) for name, col in gathers]


def test_weight_gather_detector_is_live(report):
    """The check above can fail: a program that un-splits one layer's MLP weight over tensor is caught."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    cfg = report.config
    topo = aot.get_topology(TOPOLOGY)
    mesh = aot.topology_mesh(topo, data=1, fsdp=2, tensor=2)
    weight = jax.ShapeDtypeStruct((cfg.hidden_size, cfg.intermediate_size), jax.numpy.bfloat16,
                                  sharding=NamedSharding(mesh, P(None, "tensor")))
    gather = jax.jit(lambda w: w * 2, out_shardings=NamedSharding(mesh, P()))
    c = aot.compile_and_analyze("gather", gather, [weight], {}, mesh)
    names = {name for name, _ in aot.weight_gathers_over_tensor(c.collectives, cfg, report.mesh_shape)}
    # the detector matches by shape, so a [D, F] gate/up slice and a [F, D] down slice look alike
    assert names & {"layers/mlp/gate", "layers/mlp/up", "layers/mlp/down"}, names


def test_bad_topology_and_mesh_are_clear_errors():
    with pytest.raises(aot.AotError, match=r"unknown TPU topology 'v9x:2x2'.*v5e:2x2"):
        aot.get_topology("v9x:2x2")
    with pytest.raises(aot.AotError, match=r"not available.*v5e:2x4"):
        aot.get_topology("v5e:3x3")
    topo = aot.get_topology("v5e:2x4")
    with pytest.raises(aot.AotError, match=r"divisors of 8: \[1, 2, 4, 8\]"):
        aot.topology_mesh(topo, data=1, fsdp=3, tensor=1)
    with pytest.raises(aot.AotError, match=r"product must be 8"):
        aot.topology_mesh(topo, data=2, fsdp=2, tensor=1)
    assert dict(aot.topology_mesh(topo, 1, -1, 2).shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert dict(aot.topology_mesh(topo, tensor=8).shape) == {"data": 1, "fsdp": 1, "tensor": 8}


def test_sampling_prefill_and_decode_compile_with_int8_and_cache():
    """Prefill + one decode step of the small preset on a 2x2 slice, weights int8 and split over tensor=4:
    the KV cache and the weights are where the config says, and the donated cache is not counted twice."""
    from llama_jax import LlamaConfig

    r = aot.compile_sample("small", "v5e:2x2", batch=4, context=256, prompt=64, int8=True)
    cfg = LlamaConfig.from_preset("small")
    assert r.mesh_shape == {"data": 1, "fsdp": 1, "tensor": 4} and r.fits
    cache = 2 * cfg.num_layers * 4 * 256 * cfg.num_kv_heads * cfg.head_dim * 2  # k and v, bf16
    assert r.decode.inputs["kv_cache"] == cache // 4  # KV heads split over tensor
    int8_weights = flops.matmul_params(cfg)  # layers + lm_head, 1 byte each
    bf16_embedding = cfg.vocab_size * cfg.hidden_size * 2  # a gather, not a matmul: stays bf16
    assert r.decode.inputs["params"] == pytest.approx((int8_weights + bf16_embedding) / 4, rel=0.1)
    for c in (r.prefill, r.decode):
        assert c.alias >= r.decode.inputs["kv_cache"]  # cache updated in place
        assert c.total - c.code < 1.5 * (c.inputs["params"] + c.inputs["kv_cache"]) + 2**20
    assert r.prefill.xla_flops > 10 * r.decode.xla_flops  # 64 prompt tokens vs 1


def test_hlo_replica_group_spellings_map_to_mesh_axes():
    """The three spellings of replica groups in TPU HLO, mapped to (data=1, fsdp=2, tensor=2) mesh axes
    (device id = row-major position in the mesh)."""
    mesh = {"data": 1, "fsdp": 2, "tensor": 2}
    spellings = {
        "replica_groups={{0,1},{2,3}}, use_global_device_ids=true": ("tensor",),
        "replica_groups=[2,2]<=[2,2]T(1,0), dimensions={1}": ("fsdp",),
        "replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}, use_global": ("fsdp",),
        "replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_1'}, use_global": ("tensor",),
        "replica_groups={}, to_apply=%add": ("fsdp", "tensor"),
        "source_target_pairs={{0,2},{2,0},{1,3},{3,1}}": ("fsdp",),
    }
    for attrs, axes in spellings.items():
        assert hlo.group_axes(hlo.replica_groups(attrs, 4), mesh) == axes, attrs
    text = """HloModule m
%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag = f32[16]{0} all-gather(%x), channel_id=7, replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}
}
%cond (p: (s32[], f32[8])) -> pred[] {
  %c = s32[] constant(12)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}
ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body
}
"""
    [c] = hlo.collectives(text, mesh)
    assert (c.kind, c.axes, c.bytes, c.count) == ("all-gather", ("fsdp",), 64, 12)
    assert hlo.while_loops(text) == [(12, 1, "")]


def test_qlora_start_up_quantizes_a_70b_stack_in_a_v5e_chip():
    """QLoRA's base is quantized leaf by leaf at start-up; a stacked leaf is quantized a layer at a time. The
    70B MLP stack [80, 8192, 28672] on a v5e-8 (fsdp 4 x tensor 2) then needs well under 1 GiB of temporaries
    per chip (quantized whole, XLA refuses it: 42.8 GiB of temporaries against 15.75 GiB of HBM)."""
    import functools

    import jax.numpy as jnp

    from llama_jax import LlamaConfig
    from llama_jax.model import quantize, spec
    from llama_jax.parallel.sharding import param_shardings

    topo = aot.get_topology("v5e:2x4")
    mesh = aot.topology_mesh(topo, fsdp=4, tensor=2)
    config = LlamaConfig.from_preset("llama3.1-70b").replace(param_dtype="bfloat16")
    path = ("layers", "mlp", "gate")
    shapes, shardings = spec.param_shapes(config), param_shardings(config, mesh)
    at = lambda tree: tree["layers"]["mlp"]["gate"]  # noqa: E731
    shape, sharding = at(shapes), at(shardings)
    out = at(quantize.quantized_shardings(shardings, "nf4", shapes))
    quantize_leaf = jax.jit(functools.partial(quantize.quantize_weight, path=path, kind="nf4"), out_shardings=out)
    memory = quantize_leaf.lower(jax.ShapeDtypeStruct(shape.shape, jnp.bfloat16, sharding=sharding)).compile(
    ).memory_analysis()
    assert memory.temp_size_in_bytes < 2**30


@pytest.mark.slow
def test_splash_attention_compiles_for_v5e(monkeypatch):
    """The train step with attention=splash (the default "auto" on a TPU) compiles for v5e:2x2 with the real
    Mosaic kernel, per shard: fsdp=2 x tensor=2, so the kernel runs under shard_map on 2 of the 4 heads."""
    texts = []
    collectives = hlo.collectives
    monkeypatch.setattr(hlo, "collectives", lambda text, mesh: texts.append(text) or collectives(text, mesh))
    auto = [o for o in OVERRIDES if not o.startswith("model.attention")]
    r = aot.compile_train(run_config.build("", auto + ["batch_size=8"]), TOPOLOGY, "splash")
    assert r.config.attention == "auto" and r.fits
    xla, expected = r.xla_check  # the analytic count without attention: XLA cannot see inside the kernel
    assert xla == pytest.approx(expected, rel=0.05)
    kernels = [line for line in texts[0].splitlines() if "tpu_custom_call" in line]
    # forward, and the backward's dq and dkv kernels (under full remat the forward also runs again)
    assert len(kernels) >= 3, kernels[:2]
    # per shard: rows 8 / fsdp 2, heads / tensor 2 (the whole batch and all heads on every chip without shard_map)
    cfg = r.config
    assert f"bf16[4,{cfg.num_heads // 2},128,{cfg.head_dim}]" in kernels[0], kernels[0][:300]

