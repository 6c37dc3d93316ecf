"""The training loop: data, model, optimizer, mesh, checkpoints and metrics of one run, from a RunConfig.

`train(cfg)` does, in order: resolve the data (building the built-in corpus when no path is given), the
model config (a preset, or the checkpoint of `init_from`), the mesh, and check that they fit together —
all before anything is compiled — then restore the latest checkpoint of the workdir or initialise, and loop:
next batch -> jitted step -> metrics -> periodic eval -> checkpoint. At the end it writes the final params
as a llama_jax checkpoint (WORKDIR/export, with the tokenizer) and prints a short greedy sample.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp

from llama_jax.training import data as data_lib
from llama_jax.parallel import distributed
from llama_jax.model import flops as flops_lib
from llama_jax.training import lora as lora_lib
from llama_jax.training import step as ts
from llama_jax.config import LlamaConfig
from llama_jax.training.metrics import MetricsLogger
from llama_jax.training.checkpoints import RunCheckpointer, abstract_like
from llama_jax.training.run_config import RunConfig
from llama_jax.parallel.sharding import MeshError, make_mesh, param_shardings
from llama_jax.errors import TrainError  # noqa: F401 (also re-exported)


@dataclasses.dataclass
class Setup:
    """Everything resolved before compilation."""
    cfg: RunConfig
    model: LlamaConfig
    data_path: str
    meta: dict
    mesh: Any
    tokenizer_path: Optional[str]  # the directory of the data's tokenizer files


# ------------------------------------------------------------------------------------------- resolution
def model_config(cfg: RunConfig) -> LlamaConfig:
    """The model of a from-scratch run: the preset with the run's dtype/remat/vocab overrides."""
    m = cfg.model
    kw = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)
    if m.vocab_size:
        kw["vocab_size"] = m.vocab_size
    return LlamaConfig.from_preset(m.preset, **kw)


def resolve(cfg: RunConfig, log=print) -> Setup:
    """Data, model and mesh of the run, checked against each other (nothing is compiled here)."""
    from llama_jax.training import corpus

    if cfg.init_from:
        model = _init_config(cfg.init_from).replace(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                                                    remat=cfg.model.remat)
    else:
        model = model_config(cfg)
    if cfg.data.path:
        data_path = cfg.data.path
        if not os.path.isdir(data_path):
            raise TrainError(f"data.path={data_path!r}: directory not found (make one with "
                             "`python -m llama_jax.data prepare --tokenizer TOK --out DIR FILES...`)")
    else:
        if jax.process_count() > 1:
            raise TrainError("the built-in corpus is for single-process runs; give data.path for multi-host runs")
        data_path = corpus.ensure_default_corpus(model.vocab_size, verbose=jax.process_index() == 0)
    try:
        meta = data_lib.read_meta(data_path)
        for split in (cfg.data.train_split,) + ((cfg.data.eval_split,) if cfg.eval_every else ()):
            data_lib.PackedSequences(data_path, split, cfg.seq_len)  # checks files and length now
    except data_lib.DataError as e:
        raise TrainError(str(e)) from None
    if meta["vocab_size"] > model.vocab_size:
        raise TrainError(f"{data_path}: the tokenizer has {meta['vocab_size']} tokens but the model's vocabulary "
                         f"has {model.vocab_size} ({cfg.init_from or 'preset ' + cfg.model.preset}); tokenize with "
                         "the model's tokenizer or set model.vocab_size")
    if cfg.seq_len > model.max_position_embeddings:
        raise TrainError(f"seq_len={cfg.seq_len} exceeds the model's max_position_embeddings="
                         f"{model.max_position_embeddings}")
    try:
        mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
        param_shardings(model, mesh)  # raises MeshError when a dimension cannot be split
    except MeshError as e:
        raise TrainError(f"config does not fit the mesh: {e}") from None
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.batch_size // cfg.grad_accum
    if micro % batch_shards:
        raise TrainError(f"batch_size={cfg.batch_size} / grad_accum={cfg.grad_accum} = {micro} sequences per "
                         f"micro-batch cannot be split over mesh data×fsdp = {batch_shards} devices; use a "
                         f"multiple of {batch_shards * cfg.grad_accum}")
    if cfg.batch_size % jax.process_count():
        raise TrainError(f"batch_size={cfg.batch_size} is not divisible by the {jax.process_count()} processes")
    return Setup(cfg, model, data_path, meta, mesh, data_path if data_lib.has_tokenizer(data_path) else None)


def _init_config(path: str) -> LlamaConfig:
    """The model config of an init_from checkpoint, read from its metadata (no weights are loaded)."""
    from llama_jax.io import checkpoint
    from llama_jax.io import sources

    if not os.path.isdir(path):
        raise TrainError(f"init_from={path!r}: not found (expected a llama_jax checkpoint, a training workdir, or "
                         "a Hugging Face / Meta directory)")
    for candidate in (path, os.path.join(path, "export")):
        if checkpoint.is_checkpoint(candidate):
            return checkpoint.read_metadata(candidate)[1]
    try:
        return sources.open_source(path).config
    except Exception as e:  # noqa: BLE001 - any unreadable source is the user's path problem
        raise TrainError(f"init_from={path!r}: cannot read its model config: {e}") from None


# ------------------------------------------------------------------------------------------- state
class Model:
    """The trained tree, the frozen tree and how they combine (full training or LoRA)."""

    def __init__(self, setup: Setup, optimizer):
        cfg, config, mesh = setup.cfg, setup.model, setup.mesh
        self.lora = cfg.lora.rank > 0
        self.base_shardings = param_shardings(config, mesh)
        if self.lora:
            self.shapes = lora_lib.lora_shapes(config, cfg.lora.rank, cfg.lora.targets)
            self.shardings = lora_lib.lora_shardings(config, cfg.lora.rank, cfg.lora.targets, mesh)
            self.combine = lora_lib.make_combine(cfg.lora.alpha)
            frozen = self.base_shardings
        else:
            from llama_jax.model.transformer import param_shapes
            self.shapes, self.shardings, self.combine, frozen = param_shapes(config), self.base_shardings, \
                ts.identity_combine, None
        self.state_shardings = ts.state_shardings(config, optimizer, mesh, params_shapes=self.shapes,
                                                  params_shardings=self.shardings, frozen_shardings=frozen)

    def base_params(self, setup: Setup):
        """The model weights to start from: init_from's checkpoint, or a seeded random init."""
        if setup.cfg.init_from:
            import llama_jax
            _, params = llama_jax.load(setup.cfg.init_from, dtype=setup.model.param_dtype, mesh=setup.mesh)
            return params
        from llama_jax.parallel.sharding import init_sharded_params
        return init_sharded_params(setup.model, setup.mesh, jax.random.PRNGKey(setup.cfg.seed))


# ------------------------------------------------------------------------------------------- loop
@dataclasses.dataclass
class Result:
    step: int
    losses: list
    workdir: str
    export_dir: Optional[str]
    stopped_early: bool = False
    state: Any = None  # the final TrainState


def train(cfg: RunConfig, progress: bool = True, export: bool = True, sample: bool = True) -> Result:
    """Run (or resume) training as `cfg` says; returns the final step and the logged losses."""
    main = jax.process_index() == 0
    say = print if main else (lambda *a, **k: None)
    setup = resolve(cfg, say)
    config, mesh = setup.model, setup.mesh

    schedule = ts.make_schedule(cfg.optim.lr, cfg.optim.warmup_steps, cfg.steps, cfg.optim.min_lr_ratio)
    optimizer = ts.make_optimizer(schedule, weight_decay=cfg.optim.weight_decay, b1=cfg.optim.b1, b2=cfg.optim.b2,
                                  eps=cfg.optim.eps, clip_norm=cfg.optim.clip_norm)
    model = Model(setup, optimizer)
    ckpt = RunCheckpointer(cfg.workdir, keep=cfg.keep_checkpoints)
    saved_config = {"run": cfg.to_dict(), "model": config.to_hf_dict(), "data": setup.data_path}

    frozen = None
    if model.lora:
        frozen = model.base_params(setup)
    start = ckpt.latest_step()
    data_state = None
    if start is not None:
        prev = ckpt.read_config(start)
        if prev.get("model") != saved_config["model"]:
            raise TrainError(f"{ckpt.directory}: its checkpoints are of another model; use a new workdir")
        abstract = ts.TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32, sharding=model.state_shardings.step),
            params=abstract_like(model.shapes, model.shardings),
            opt_state=abstract_like(jax.eval_shape(optimizer.init, model.shapes), model.state_shardings.opt_state))
        tree, data_state, _ = ckpt.restore(start, abstract)
        state = ts.TrainState(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"], frozen=frozen)
        say(f"resumed from {ckpt.directory}/{start}")
    else:
        start = 0
        params = (jax.jit(lambda k: lora_lib.init_lora(config, cfg.lora.rank, cfg.lora.targets, k),
                          out_shardings=model.shardings)(jax.random.PRNGKey(cfg.seed + 1))
                  if model.lora else model.base_params(setup))
        state = ts.init_train_state(params, optimizer, model.state_shardings, frozen=frozen)

    pcount = jax.process_count()
    rows = distributed.process_batch_rows(mesh, cfg.batch_size)
    train_ds = data_lib.make_dataset(setup.data_path, cfg.data.train_split, cfg.seq_len, cfg.batch_size, cfg.seed,
                                     rows)
    it = data_lib.make_iterator(train_ds, data_state, cfg.data.threads, cfg.data.prefetch)
    step_fn = ts.make_train_step(config, optimizer, mesh, shardings=model.state_shardings, schedule=schedule,
                                 accum_steps=cfg.grad_accum, combine=model.combine)
    eval_fn = ts.make_eval_step(config, mesh, params_shardings=model.shardings, combine=model.combine,
                                frozen_shardings=model.state_shardings.frozen) if cfg.eval_every else None

    flops_per_token = flops_lib.train_flops_per_token(config, cfg.seq_len)
    peak = cfg.peak_flops or flops_lib.peak_flops(jax.devices()[0].device_kind) or 0.0
    tokens_per_step = cfg.batch_size * cfg.seq_len
    if main:
        os.makedirs(cfg.workdir, exist_ok=True)
        with open(os.path.join(cfg.workdir, "run_config.json"), "w") as f:
            json.dump(saved_config, f, indent=1)
        n_train = sum(math.prod(s.shape) for s in jax.tree.leaves(model.shapes))
        say(f"model {config.name or 'custom'}: {config.num_params() / 1e6:.1f}M params ({n_train / 1e6:.2f}M "
            f"trained), mesh {dict(mesh.shape)}, batch {cfg.batch_size}x{cfg.seq_len}, steps {start}->{cfg.steps}, "
            f"workdir {cfg.workdir}", flush=True)
    metrics = MetricsLogger(cfg.workdir, cfg.steps, start, enabled=main, progress=progress)

    stop = {"sigterm": False}
    old_handler = None
    if pcount == 1:
        def on_sigterm(signum, frame):
            stop["sigterm"] = True
        old_handler = signal.signal(signal.SIGTERM, on_sigterm)

    losses, last_good = [], ckpt.latest_step()
    t_last, step_last, stopped = time.perf_counter(), start, False
    try:
        for step in range(start, cfg.steps):
            batch = distributed.global_batch(next(it), mesh, cfg.batch_size)
            state, m = step_fn(state, batch)
            done = step + 1
            metrics.advance(done)
            # read the flag once: a SIGTERM landing later in this iteration is handled at the next step
            preempted = stop["sigterm"] or (pcount > 1 and ckpt.reached_preemption(done))
            is_ckpt = done % cfg.checkpoint_every == 0 or done == cfg.steps or preempted
            if done % cfg.log_every == 0 or is_ckpt:
                m = {k: distributed.to_host(v) for k, v in m.items()}
                loss = float(m["loss"])
                if not (math.isfinite(loss) and math.isfinite(float(m["grad_norm"]))):
                    raise TrainError(f"loss is {loss} (grad norm {float(m['grad_norm'])}) at step {done}: stopping. "
                                     f"The last good checkpoint is step {last_good} in {ckpt.directory}; lower "
                                     "optim.lr or check the data, then restart from it.")
                now = time.perf_counter()
                step_time = (now - t_last) / (done - step_last)
                t_last, step_last = now, done
                row = {"loss": loss, "lr": float(m["learning_rate"]), "grad_norm": float(m["grad_norm"]),
                       "step_time": step_time, "tokens_per_s": tokens_per_step / step_time}
                if peak:
                    row["mfu"] = flops_per_token * row["tokens_per_s"] / (peak * jax.device_count())
                if done == start + 1:
                    row["first_step_includes_compile"] = True
                losses.append((done, loss))
                metrics.log(done, row)
            if eval_fn is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
                eval_loss = evaluate(eval_fn, state, setup, rows)
                if eval_loss is not None:
                    metrics.log(done, {"eval_loss": eval_loss})
                t_last = time.perf_counter()  # eval time is not step time
            if is_ckpt:
                ckpt.save(done, state, it.get_state(), saved_config)
                last_good = done
            if preempted:
                metrics.write(f"SIGTERM: saved checkpoint {done}, stopping (restart with the same workdir to resume)")
                stopped = True
                break
    finally:
        ckpt.close()
        metrics.close()

    export_dir = None
    try:  # a SIGTERM from here on is ignored: the last checkpoint is written, the export is short
        if export and not stopped:
            params = state.params if not model.lora else lora_lib.merge(state.frozen, state.params, cfg.lora.alpha)
            export_dir = export_params(cfg.workdir, config, params, setup.tokenizer_path)
            if sample and cfg.sample_tokens and pcount == 1 and setup.tokenizer_path:
                say("sample (greedy): " + greedy_sample(config, params, setup.tokenizer_path, cfg.sample_prompt,
                                                         cfg.sample_tokens, mesh))
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    return Result(int(state.step), losses, cfg.workdir, export_dir, stopped, state)


def evaluate(eval_fn, state, setup: Setup, rows) -> Optional[float]:
    """Token-weighted mean loss over the first eval_batches batches of the held-out split (file order); None
    when the split holds less than one batch."""
    cfg = setup.cfg
    ds = data_lib.make_dataset(setup.data_path, cfg.data.eval_split, cfg.seq_len, cfg.batch_size, cfg.seed, rows,
                               shuffle=False)
    total, weight = 0.0, 0.0
    for i in range(min(cfg.eval_batches, len(ds))):
        batch = distributed.global_batch(ds[i], setup.mesh, cfg.batch_size)
        m = {k: distributed.to_host(v) for k, v in eval_fn(state.params, state.frozen, batch).items()}
        total += float(m["loss"]) * float(m["tokens"])
        weight += float(m["tokens"])
    return total / weight if weight else None


# ------------------------------------------------------------------------------------------- export / sample
def export_params(workdir: str, config: LlamaConfig, params, tokenizer_dir: Optional[str]) -> str:
    """Write `params` as a llama_jax checkpoint in WORKDIR/export (+ the tokenizer files of `tokenizer_dir`, also
    copied to WORKDIR itself), so `llama_jax.load(WORKDIR)`, `llama_jax.load_tokenizer(WORKDIR)`, sample.py
    and the converter (`python -m llama_jax.convert --to-hf WORKDIR/export OUT`) read it. Collective: every
    process calls it."""
    import orbax.checkpoint as ocp

    from llama_jax.io import checkpoint

    workdir = os.path.abspath(workdir)
    out = os.path.join(workdir, "export")
    os.makedirs(out, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(out, checkpoint.PARAMS_DIR), params, force=True)
    if jax.process_index() == 0:
        checkpoint.write_metadata(out, config, config.param_dtype, source={"trained_by": "train.py",
                                                                          "workdir": workdir})
        if tokenizer_dir:
            for d in (out, workdir):
                data_lib.copy_tokenizer_files(tokenizer_dir, d)
    return out


def greedy_sample(config: LlamaConfig, params, tokenizer_path: str, prompt: str, n: int, mesh=None) -> str:
    """A short greedy continuation of `prompt` with the compiled sampler (llama_jax.sampling.sampler)."""
    from llama_jax.sampling.sampler import generate_ids

    tok = data_lib.load_text_tokenizer(tokenizer_path)
    ids = tok.encode(prompt, bos=True)
    n = max(0, min(n, config.max_position_embeddings - len(ids)))
    out = generate_ids(params, config, [ids], max_new_tokens=n, stop_ids=tuple(config.eos_token_id), mesh=mesh)
    # decode prompt and continuation together: SentencePiece drops a word-initial space at the start of a decode
    return tok.decode([i for i in ids if i != tok.bos_id] + list(out[0]))
