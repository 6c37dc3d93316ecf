"""Training metrics: a tqdm progress bar, WORKDIR/metrics.jsonl and TensorBoard event files.

Only process 0 writes. A gs:// workdir (no appends in Cloud Storage) keeps the files in a local mirror
(io/paths.py's cache_dir) and uploads them every 30 s, at each checkpoint and at the end. On resume, metrics.jsonl keeps the lines up to the restored step and drops the rest
(steps the interrupted run logged after its last checkpoint are trained again), so the file of a resumed run
reads like the file of a run that was never interrupted.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Dict

from llama_jax.io import paths

# Shown on the progress bar (the rest goes to the files only), with their formats.
_BAR = (("loss", "{:.3f}"), ("tok/s", "{:.0f}"), ("mfu", "{:.1%}"), ("eval_loss", "{:.3f}"))


def _summary_writer():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch only to accept torch
    tensors when it is installed, which costs seconds at every start of train.py. Blocking the import for
    the moment makes tensorboardX take its own no-torch path (it catches the ImportError)."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` now raises ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def truncate_jsonl(path: str, last_step: int) -> None:
    """Keep only the lines of `path` whose step is <= last_step (a half-written last line is dropped)."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step", 0) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(path, "w") as f:
        f.writelines(kept)


def read_jsonl(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLogger:
    """`log(step, {...})` -> progress bar postfix, one JSON line, TensorBoard scalars (process 0 only)."""

    def __init__(self, workdir: str, total_steps: int, start_step: int = 0, enabled: bool = True,
                 progress: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.remote, self.synced = (workdir if paths.is_remote(workdir) else None), time.monotonic()
        if self.remote and enabled:
            workdir = _mirror(workdir)
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.bar = self.tb = self.file = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        truncate_jsonl(self.path, start_step)
        self.file = open(self.path, "a")
        if tensorboard:
            self.tb = _summary_writer()(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self._bar_values: Dict[str, str] = {}
        # Without a bar (logs, --no_progress) about 20 plain lines per run say how it goes.
        self.print_every = max(1, total_steps // 20)

    def log(self, step: int, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if not isinstance(v, (bool, str)) else v) for k, v in values.items()}
        rec = {"step": int(step), **{k: (v if not (isinstance(v, float) and not math.isfinite(v)) else str(v))
                                     for k, v in clean.items()}}
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.remote and time.monotonic() - self.synced > 30:
            self._upload()
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(f"train/{k}" if not k.startswith("eval") else k.replace("_", "/", 1), v, step)
        shown = {k: fmt.format(clean[key]) for k, fmt in _BAR
                 for key in [{"tok/s": "tokens_per_s"}.get(k, k)] if isinstance(clean.get(key), float)}
        if self.bar is not None:
            self._bar_values.update(shown)
            self.bar.set_postfix(self._bar_values, refresh=False)
        elif shown and (step % self.print_every == 0 or "eval_loss" in clean):
            print(f"step {step}: " + ", ".join(f"{k} {v}" for k, v in shown.items()), flush=True)

    def advance(self, step: int) -> None:
        """Move the bar to `step` (called every step, logged or not)."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def write(self, msg: str) -> None:
        """Print without breaking the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()
            if self.remote:
                self._upload()

    def sync(self) -> None:
        """In a gs:// workdir: upload the files now (at each checkpoint, so a resumed run's file has no gap)."""
        if self.enabled and self.remote and self.file is not None:
            self._upload()

    def _upload(self) -> None:
        """Copy the local mirror's files (metrics.jsonl, TensorBoard events) into the gs:// workdir."""
        if self.tb is not None:
            self.tb.flush()
        local = os.path.dirname(self.path)
        for root, _, files in os.walk(local):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), local)
                if rel == "metrics.jsonl" or rel.startswith("tensorboard" + os.sep):
                    paths.copy_file(os.path.join(root, name), paths.join(self.remote, *rel.split(os.sep)))
        self.synced = time.monotonic()


def _mirror(workdir: str) -> str:
    """The local mirror of gs:// `workdir`, holding the workdir's metrics.jsonl (a resumed run continues it)."""
    local = paths.cache_dir(workdir)
    os.makedirs(local, exist_ok=True)
    remote, mine = paths.join(workdir, "metrics.jsonl"), os.path.join(local, "metrics.jsonl")
    if paths.isfile(remote):
        paths.copy_file(remote, mine)
    elif os.path.exists(mine):
        os.remove(mine)  # left by an earlier run of a workdir since removed
    return local
