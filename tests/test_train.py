"""train.py and the trainer: the default run (short), exact resume after SIGKILL and SIGTERM, gradient
accumulation, two processes of 4 devices vs one of 8, NaN handling, errors reported before compilation, and
the run config's overrides."""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from test_data import CACHE_ROOT, corpus_dir

from llama_jax.errors import TrainError
from llama_jax.training import run_config
from llama_jax.training import step as ts
from llama_jax.training.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A fast version of the default run: the same pipeline (built-in corpus, SentencePiece, packing, Orbax)
# with the tiny model.
TINY = ["model.preset=tiny", "model.vocab_size=512", "batch_size=8", "seq_len=64", "optim.lr=3e-3",
        "optim.warmup_steps=2", "eval_every=0", "sample_tokens=0", "log_every=1"]


def _env(devices: int) -> dict:
    # The runs of one test compile the same programs: jax's persistent cache compiles them once.
    return dict(os.environ, JAX_PLATFORMS="cpu", LLAMA_JAX_CACHE=CACHE_ROOT,
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_COMPILATION_CACHE_DIR=os.path.join(CACHE_ROOT, "jax-cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _train(args, devices=1, check=True, timeout=240):
    proc = subprocess.run([sys.executable, "train.py", "--no_progress", *args], cwd=ROOT, env=_env(devices),
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _losses(workdir):
    return [(r["step"], r["loss"]) for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]


# ------------------------------------------------------------------------------------------- config
def test_overrides_are_typed_and_unknown_keys_name_the_closest():
    cfg = run_config.build("configs/small.py", ["steps=7", "mesh.fsdp=2", "optim.lr=1e-4", "lora.targets=q,v",
                                                "init_from=ckpt/x", "seed=3", "checkpoint_every=2"])
    assert (cfg.steps, cfg.mesh.fsdp, cfg.optim.lr, cfg.lora.targets, cfg.seed) == (7, 2, 1e-4, ("q", "v"), 3)
    with pytest.raises(run_config.RunConfigError, match="did you mean 'checkpoint_every'"):
        run_config.build("", ["checkpont_every=3"])
    with pytest.raises(run_config.RunConfigError, match="did you mean 'mesh.tensor'"):
        run_config.build("", ["mesh.tensr=3"])
    with pytest.raises(run_config.RunConfigError, match="steps='ten': expected a value of type int"):
        run_config.build("", ["steps=ten"])
    with pytest.raises(run_config.RunConfigError, match="lora.targets"):
        run_config.build("", ["lora.targets=q,zz"])
    for name in ("small", "small-lora", "llama3.2-1b", "llama3.1-8b", "llama2-7b", "llama3.1-70b", "llama3.1-405b"):
        recipe = run_config.load_recipe(os.path.join(ROOT, "configs", f"{name}.py"))
        assert run_config.RunConfig.from_dict(recipe.to_dict()) == recipe


def test_the_run_config_has_one_size_per_mesh_axis():
    import dataclasses

    from llama_jax.parallel.sharding import MESH_AXES

    assert tuple(f.name for f in dataclasses.fields(run_config.MeshSection)) == MESH_AXES


# ------------------------------------------------------------------------------------------- optimizer
@pytest.mark.parametrize("peak, warmup, total, ratio", [(3e-3, 20, 200, 0.1), (1e-2, 1, 4, 0.1),
                                                        (1e-3, 0, 50, 0.0), (1e-3, 10, 5, 0.1)])
def test_schedule_is_optax_warmup_joined_with_cosine(peak, warmup, total, ratio):
    """make_schedule draws the curve of optax.linear_schedule joined with optax.cosine_decay_schedule (written
    out for its float32 rounding: see training/optim.py): the first update at peak/warmup, peak at the last
    warmup step and at the first cosine step, end_lr_ratio * peak from total_steps on."""
    import jax
    import jax.numpy as jnp
    import optax

    from llama_jax.training.optim import make_schedule

    w = max(warmup, 1)
    ref = optax.join_schedules([optax.linear_schedule(peak / w, peak, w - 1),
                                optax.cosine_decay_schedule(peak, max(total - warmup, 1), alpha=ratio)], [warmup])
    steps = jnp.arange(max(total, warmup + 1) + 5)
    ours = np.asarray(jax.vmap(make_schedule(peak, warmup, total, ratio))(steps))
    np.testing.assert_allclose(ours, np.asarray(jax.vmap(ref)(steps)), rtol=1e-5, atol=peak * 1e-7)
    np.testing.assert_allclose(ours[0], peak / w if warmup else peak, rtol=1e-6)
    np.testing.assert_allclose(ours[warmup], peak, rtol=1e-6)
    np.testing.assert_allclose(ours[max(total, warmup + 1):], peak * ratio, rtol=1e-6, atol=peak * 1e-7)


# ------------------------------------------------------------------------------------------- default run
def test_default_run_short_loss_falls_and_writes_a_loadable_checkpoint(tmp_path):
    """`python train.py` with the default pipeline (built-in corpus, its tokenizer, Orbax, export, sample)."""
    corpus_dir()  # build the corpus outside the timed run (shared with the other tests)
    work = str(tmp_path / "run")
    proc = _train([f"workdir={work}", *TINY, "steps=25", "checkpoint_every=10", "eval_every=25",
                   "sample_tokens=8"])
    losses = [l for _, l in _losses(work)]
    assert len(losses) == 25
    assert np.mean(losses[-5:]) < losses[0] - 1.0, losses  # from ~6.2 (= log 512) down
    rows = read_jsonl(os.path.join(work, "metrics.jsonl"))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "step_time"} <= set(rows[3])
    assert any("eval_loss" in r for r in rows)
    assert "sample (greedy): The" in proc.stdout
    assert os.listdir(os.path.join(work, "tensorboard"))
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["10", "20", "25"]
    # what sample.py reads: llama_jax.load + load_tokenizer on the workdir
    import llama_jax
    from llama_jax.text.tokenizer import load_tokenizer
    config, params = llama_jax.load(work)
    assert config.vocab_size == 512 and config.num_layers == 2
    assert load_tokenizer(work).vocab_size == 512


# ------------------------------------------------------------------------------------------- resume
def _wait_for_checkpoint(proc, workdir, after: int, timeout=180):
    """Block until a complete checkpoint newer than `after` exists; returns its step."""
    ckpts = os.path.join(workdir, "checkpoints")
    t0 = time.time()
    while time.time() - t0 < timeout:
        steps = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if os.path.isdir(ckpts) else []
        if steps and max(steps) > after:
            return max(steps)
        assert proc.poll() is None, "the run ended before writing a checkpoint"
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
def test_sigkill_and_sigterm_then_resume_equal_an_uninterrupted_run(tmp_path):
    corpus_dir()
    args = [*TINY, "steps=40", "checkpoint_every=5", "keep_checkpoints=2"]
    straight = str(tmp_path / "straight")
    reference = subprocess.Popen([sys.executable, "train.py", "--no_progress", f"workdir={straight}", *args],
                                 cwd=ROOT, env=_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    work = str(tmp_path / "interrupted")
    cmd = [sys.executable, "train.py", "--no_progress", f"workdir={work}", *args]
    # 1. SIGKILL right after the first checkpoint lands (the run is somewhere past it)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = _wait_for_checkpoint(proc, work, 0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged = _losses(work)
    assert first <= logged[-1][0] < 40, "the run was not interrupted mid-way"
    assert reference.wait(timeout=240) == 0, reference.stderr.read()[-3000:]
    expected = _losses(straight)
    assert [s for s, _ in expected] == list(range(1, 41))
    # 2. resume; SIGTERM (preemption) after its next checkpoint: it saves where it is and exits cleanly
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = _wait_for_checkpoint(proc, work, first)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in out and "SIGTERM: saved checkpoint" in out, out
    stopped_at = int(out.split("SIGTERM: saved checkpoint ")[1].split(",")[0])
    assert second <= stopped_at < 40 and os.path.isdir(os.path.join(work, "checkpoints", str(stopped_at)))
    # 3. resume to the end
    proc3 = _train([f"workdir={work}", *args])
    assert "resumed from" in proc3.stdout
    resumed = _losses(work)
    assert resumed == expected  # bitwise: the same floats at every step


# ------------------------------------------------------------------------------------------- accumulation
@pytest.mark.slow
def test_grad_accumulation_equals_a_k_times_larger_batch(tmp_path):
    from llama_jax.training import loop as trainer
    path = corpus_dir()
    results = []
    for k in (1, 4):
        cfg = run_config.build("", [f"workdir={tmp_path}/k{k}", *TINY, f"data.path={path}", "batch_size=32",
                                    f"grad_accum={k}", "steps=3", "checkpoint_every=100", "mesh.fsdp=8"])
        results.append(trainer.train(cfg, progress=False, export=False))
    (l1, r1), (l4, r4) = [([l for _, l in r.losses], r) for r in results]
    np.testing.assert_allclose(l1, l4, rtol=2e-5)
    assert l1[0] != l1[-1]
    import jax
    for a, b in zip(jax.tree.leaves(r1.state.params), jax.tree.leaves(r4.state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-4)


# ------------------------------------------------------------------------------------------- multi-host
def outputs_of(procs, timeout: float = 300):
    """The text output of each process (stdout piped), waiting for all; any still running at the end is killed,
    never left behind (a dead peer blocks the others in a collective)."""
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_of_four_devices_train_like_one_of_eight(tmp_path):
    # the two processes run the default command (no data.path: the built-in corpus, which each process finds
    # or builds and checks against process 0's); the one process reads the same corpus through data.path
    path = corpus_dir()
    args = [*TINY, "steps=4", "checkpoint_every=2", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    one, two, port = str(tmp_path / "one"), str(tmp_path / "two"), _free_port()
    flags = [[f"data.path={path}"]] + [["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
                                        "--process_id", str(i)] for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "train.py", "--no_progress", f"workdir={one if i == 0 else two}",
                               *args, *f], cwd=ROOT, env=_env(8 if i == 0 else 4), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i, f in enumerate(flags)]
    outs = outputs_of(procs)
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(o[-2000:] for o in outs)
    a, b = _losses(one), _losses(two)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    np.testing.assert_allclose([l for _, l in a], [l for _, l in b], rtol=1e-6)
    assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == ["2", "4"]


# ------------------------------------------------------------------------------------------- faults
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import jax.numpy as jnp

    from llama_jax.training import loop as trainer
    from llama_jax.training.checkpoints import RunCheckpointer

    real = ts.make_train_step

    def poisoned(*args, **kwargs):
        step = real(*args, **kwargs)

        def run(state, batch):
            new_state, metrics = step(state, batch)
            if int(new_state.step) >= 5:  # from step 5 on the "model diverges"
                metrics = dict(metrics, loss=metrics["loss"] * jnp.nan)
            return new_state, metrics
        return run

    monkeypatch.setattr(ts, "make_train_step", poisoned)
    cfg = run_config.build("", [f"workdir={tmp_path}", *TINY, f"data.path={corpus_dir()}", "steps=10",
                                "checkpoint_every=2", "mesh.fsdp=8"])
    with pytest.raises(TrainError, match=r"loss is nan .* at step 5.*last good checkpoint is step 4"):
        trainer.train(cfg, progress=False)
    assert RunCheckpointer(str(tmp_path)).all_steps() == [2, 4]


@pytest.mark.parametrize("override, message", [
    ("data.path=/nonexistent/tokens", "data.path='/nonexistent/tokens': directory not found"),
    ("model.vocab_size=256", "the tokenizer has 512 tokens but the model's vocabulary has 256"),
    ("mesh.tensor=3", "config does not fit the mesh"),
    ("mesh.tensor=8", "dimension 'heads' of size 4 cannot be split over mesh axis tensor of size 8"),
    ("batch_size=4", "cannot be split over mesh data×fsdp = 8 devices"),
    ("seq_len=1024", "exceeds the model's max_position_embeddings"),
])
def test_bad_setups_are_reported_before_compilation(tmp_path, monkeypatch, override, message):
    from llama_jax.training import loop as trainer

    def no_compile(*a, **k):
        raise AssertionError("compiled before the error was reported")

    monkeypatch.setattr(ts, "make_train_step", no_compile)
    monkeypatch.setattr(ts, "init_train_state", no_compile)
    cfg = run_config.build("", [f"workdir={tmp_path}", *TINY, f"data.path={corpus_dir()}", "steps=2", override])
    with pytest.raises(TrainError, match=message):
        trainer.train(cfg, progress=False)


def test_missing_data_file_is_named(tmp_path):
    import shutil

    from llama_jax.training.setup import resolve
    data_copy = str(tmp_path / "tokens")
    shutil.copytree(corpus_dir(), data_copy)
    os.remove(os.path.join(data_copy, "val.bin"))
    cfg = run_config.build("", [f"workdir={tmp_path}/w", *TINY, f"data.path={data_copy}", "eval_every=5"])
    with pytest.raises(TrainError, match="val.bin: missing data file"):
        resolve(cfg)


# ------------------------------------------------------------------------------------------- MFU
@pytest.mark.parametrize("preset", ["tiny", "llama3.2-1b"])
def test_flops_per_token_counts_every_matmul_weight(preset):
    import math

    from llama_jax import LlamaConfig, param_shapes
    from llama_jax.model import flops
    config = LlamaConfig.from_preset(preset)
    shapes = param_shapes(config)
    # the stacked projections (rank >= 3) and the output head are one matmul per token; the embedding lookup
    # and the norm scales are not (a tied embedding counts once, as the head)
    kernels = sum(math.prod(s.shape) for p, s in jax_leaves_with_path(shapes) if len(s.shape) >= 3 or p == "lm_head")
    head = config.vocab_size * config.hidden_size if config.tie_word_embeddings else 0
    assert flops.matmul_params(config) == kernels + head
    attention = 6 * config.num_layers * config.num_heads * config.head_dim * 1024
    assert flops.train_flops_per_token(config, 1024) == 6 * (kernels + head) + attention
    assert flops.peak_flops("TPU v5 lite") == 197e12 and flops.peak_flops("TPU v5p") == 459e12
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and flops.peak_flops("cpu") is None


def jax_leaves_with_path(tree):
    import jax
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [("/".join(str(getattr(k, "key", k)) for k in p), s) for p, s in leaves]


def test_metrics_without_a_progress_bar_print_plain_lines(tmp_path, capsys):
    from llama_jax.training.metrics import MetricsLogger

    log = MetricsLogger(str(tmp_path), total_steps=40, progress=False, tensorboard=False)
    for step in range(1, 41):
        log.log(step, {"loss": 5.0 - step / 100, "tokens_per_s": 1000.0})
    log.log(40, {"eval_loss": 4.5})
    log.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "step 2: loss 4.980, tok/s 1000" and len(lines) == 21
    assert lines[-1] == "step 40: eval_loss 4.500"
    assert len(read_jsonl(str(tmp_path / "metrics.jsonl"))) == 41
