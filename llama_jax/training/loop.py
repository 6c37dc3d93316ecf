"""The training loop of one run, from a RunConfig: `train(cfg) -> Result`.

`train` runs these stages, each in its own file:
    setup    training/setup.py    data (the built-in corpus when no path is given), model config (a preset or
                                  init_from's checkpoint) and mesh, checked against each other before anything
                                  is compiled
    resume   training/state.py    the workdir's latest checkpoint, or a fresh init (LoRA: adapters over the
                                  frozen base)
    loop     here                 next batch -> jitted step -> metrics -> periodic eval -> checkpoint
    export   training/export.py   the final params as a llama_jax checkpoint (WORKDIR/export, with the
                                  tokenizer) and a short greedy sample
    eval     training/eval_tasks.py   with eval_tasks=..., lm-eval tasks on the final params (llama_jax.eval)
The optimizer comes from training/optim.py's `build_optimizer`, as in the ahead-of-time compile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from typing import Any, Optional

import jax

from llama_jax.errors import TrainError
from llama_jax.io import paths
from llama_jax.model import flops as flops_lib
from llama_jax.parallel import distributed
from llama_jax.training import data as data_lib
from llama_jax.training import dpo
from llama_jax.training import eval_tasks
from llama_jax.training import step as ts
from llama_jax.training.checkpoints import RunCheckpointer
from llama_jax.training.export import export_run
from llama_jax.training.metrics import MetricsLogger
from llama_jax.training.optim import build_optimizer
from llama_jax.training.run_config import RunConfig
from llama_jax.training.setup import Setup, resolve
from llama_jax.training.state import Model, start_state


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
    if cfg.eval_tasks:
        eval_tasks.check(setup)  # a misspelt lm-eval task fails before the first step, not after the run
    optimizer, schedule = build_optimizer(cfg)
    model = Model(setup, optimizer)
    ckpt = RunCheckpointer(cfg.workdir, keep=cfg.keep_checkpoints)
    saved_config = {"run": cfg.to_dict(), "model": setup.model.to_hf_dict(), "data": setup.data_path}
    state, start, data_state = start_state(setup, model, optimizer, ckpt, saved_config, say)

    rows = distributed.process_batch_rows(setup.mesh, cfg.batch_size)
    train_ds = dpo.dataset_fn(cfg)(setup.data_path, cfg.data.train_split, cfg.seq_len, cfg.batch_size, cfg.seed,
                                     rows)
    it = data_lib.make_iterator(train_ds, data_state, cfg.data.threads, cfg.data.prefetch)
    step_fn = ts.make_train_step(setup.model, optimizer, setup.mesh, shardings=model.state_shardings,
                                 schedule=schedule, accum_steps=cfg.grad_accum, combine=model.combine,
                                 objective=dpo.objective(cfg, setup.model))
    eval_fn = ts.make_eval_step(setup.model, setup.mesh, params_shardings=model.shardings, combine=model.combine,
                                frozen_shardings=model.state_shardings.frozen,
                                objective=dpo.objective(cfg, setup.model)) if cfg.eval_every else None
    if main:
        _announce(setup, model, saved_config, start, say)
    metrics = MetricsLogger(cfg.workdir, cfg.steps, start, enabled=main, progress=progress)

    loop = Loop(setup, step_fn, eval_fn, it, ckpt, metrics, saved_config, rows)
    with _sigterm_flag() as stop:
        state, losses, stopped = loop.run(state, start, stop)
        # a SIGTERM from here on is ignored: the last checkpoint is written, the export is short
        export_dir = export_run(setup, state, model.lora, sample, say) if export and not stopped else None
        if cfg.eval_tasks and not stopped:
            eval_tasks.run(setup, state, model.lora, say)
    return Result(int(state.step), losses, cfg.workdir, export_dir, stopped, state)


def _announce(setup: Setup, model: Model, saved_config: dict, start: int, say) -> None:
    """Write WORKDIR/run_config.json and print the one-line summary of the run (process 0)."""
    cfg, config = setup.cfg, setup.model
    paths.makedirs(cfg.workdir)  # local or gs://
    with paths.open(paths.join(cfg.workdir, "run_config.json"), "w") as f:
        f.write(json.dumps(saved_config, indent=1))
    n_train = sum(math.prod(s.shape) for s in jax.tree.leaves(model.shapes))
    say(f"model {config.name or 'custom'}: {flops_lib.num_params(config) / 1e6:.1f}M params ({n_train / 1e6:.2f}M "
        f"trained), mesh {dict(setup.mesh.shape)}, batch {cfg.batch_size}x{cfg.seq_len}, steps {start}->"
        f"{cfg.steps}, workdir {cfg.workdir}", flush=True)


@contextlib.contextmanager
def _sigterm_flag():
    """{"sigterm": bool}, set by a SIGTERM while the block runs, the previous handler restored after. Only in
    single-process runs: multi-host runs learn of a preemption from the checkpoint manager."""
    stop = {"sigterm": False}
    if jax.process_count() > 1:
        yield stop
        return

    def on_sigterm(signum, frame):
        stop["sigterm"] = True

    old_handler = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, old_handler)


# ------------------------------------------------------------------------------------------- loop
class Loop:
    """The steps of one run: next batch -> jitted step -> metrics -> periodic eval -> checkpoint."""

    def __init__(self, setup: Setup, step_fn, eval_fn, it, ckpt: RunCheckpointer, metrics: MetricsLogger,
                 saved_config: dict, rows):
        self.setup, self.cfg, self.step_fn, self.eval_fn, self.it = setup, setup.cfg, step_fn, eval_fn, it
        self.ckpt, self.metrics, self.saved_config, self.rows = ckpt, metrics, saved_config, rows
        self.flops_per_token = flops_lib.train_flops_per_token(setup.model, self.cfg.seq_len)
        self.peak = self.cfg.peak_flops or flops_lib.peak_flops(jax.devices()[0].device_kind) or 0.0

    def run(self, state, start: int, stop: dict):
        """Steps start..cfg.steps (fewer when `stop["sigterm"]` is set or a multi-host preemption is seen)
        -> (final state, [(step, loss)] logged, stopped early). Closes the checkpointer and the logger."""
        cfg, ckpt, pcount = self.cfg, self.ckpt, jax.process_count()
        losses, last_good, clock = [], ckpt.latest_step(), _Clock(start)
        try:
            for step in range(start, cfg.steps):
                batch = distributed.global_batch(next(self.it), self.setup.mesh, cfg.batch_size)
                state, m = self.step_fn(state, batch)
                done = step + 1
                self.metrics.advance(done)
                # read the flag once: a SIGTERM landing later in this iteration is handled at the next step
                preempted = stop["sigterm"] or (pcount > 1 and ckpt.reached_preemption(done))
                is_ckpt = done % cfg.checkpoint_every == 0 or done == cfg.steps or preempted
                if done % cfg.log_every == 0 or is_ckpt:
                    losses.append((done, self._log(done, m, start, clock, last_good)))
                if self.eval_fn is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
                    eval_loss = evaluate(self.eval_fn, state, self.setup, self.rows)
                    if eval_loss is not None:
                        self.metrics.log(done, {"eval_loss": eval_loss})
                    clock.restart()  # eval time is not step time
                if is_ckpt:
                    ckpt.save(done, state, self.it.get_state(), self.saved_config)
                    self.metrics.sync()  # a gs:// workdir: its metrics.jsonl reaches the checkpoint's step
                    last_good = done
                if preempted:
                    self.metrics.write(f"SIGTERM: saved checkpoint {done}, stopping (restart with the same "
                                       "workdir to resume)")
                    return state, losses, True
        finally:
            ckpt.close()
            self.metrics.close()
        return state, losses, False

    def _log(self, done: int, m: dict, start: int, clock: "_Clock", last_good: Optional[int]) -> float:
        """Log the step's metrics row (loss, lr, grad norm, speed, MFU) and return its loss; a TrainError that
        names the last good checkpoint when the loss or gradient is not finite."""
        m = {k: distributed.to_host(v) for k, v in m.items()}  # waits for the step: time it after this
        loss = float(m["loss"])
        if not (math.isfinite(loss) and math.isfinite(float(m["grad_norm"]))):
            raise TrainError(f"loss is {loss} (grad norm {float(m['grad_norm'])}) at step {done}: stopping. "
                             f"The last good checkpoint is step {last_good} in {self.ckpt.directory}; lower "
                             "optim.lr or check the data, then restart from it.")
        step_time = clock.lap(done)
        row = {"loss": loss, "lr": float(m["learning_rate"]), "grad_norm": float(m["grad_norm"]),
               "step_time": step_time, "tokens_per_s": self.cfg.batch_size * self.cfg.seq_len / step_time}
        if self.peak:
            row["mfu"] = self.flops_per_token * row["tokens_per_s"] / (self.peak * jax.device_count())
        row.update({k: float(m[k]) for k in dpo.METRICS if k in m})  # objective=dpo's reward metrics
        if done == start + 1:
            row["first_step_includes_compile"] = True
        self.metrics.log(done, row)
        return loss


class _Clock:
    """Seconds per step between logged steps."""

    def __init__(self, step: int):
        self.t, self.step = time.perf_counter(), step

    def lap(self, done: int) -> float:
        now = time.perf_counter()
        seconds = (now - self.t) / (done - self.step)
        self.t, self.step = now, done
        return seconds

    def restart(self) -> None:
        self.t = time.perf_counter()


def evaluate(eval_fn, state, setup: Setup, rows) -> Optional[float]:
    """Token-weighted mean loss over the first eval_batches batches of the held-out split (file order); None
    when the split holds less than one batch."""
    cfg = setup.cfg
    ds = dpo.dataset_fn(cfg)(setup.data_path, cfg.data.eval_split, cfg.seq_len, cfg.batch_size, cfg.seed, rows,
                               shuffle=False)
    total, weight = 0.0, 0.0
    for i in range(min(cfg.eval_batches, len(ds))):
        batch = distributed.global_batch(ds[i], setup.mesh, cfg.batch_size)
        m = {k: distributed.to_host(v) for k, v in eval_fn(state.params, state.frozen, batch).items()}
        total += float(m["loss"]) * float(m["tokens"])
        weight += float(m["tokens"])
    return total / weight if weight else None
