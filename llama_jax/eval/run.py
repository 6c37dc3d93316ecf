"""Running lm-eval tasks on a JaxLM: task lookup (local YAMLs and lm-eval's own), results as JSON and in
TensorBoard, and the end-of-training evaluation (`evaluate_params`).

Local tasks are lm-eval YAML files in a folder given as `include_path` (lm-eval's TaskManager); their data
can be local files (`dataset_path: json` with `dataset_kwargs: {data_files: ...}`, paths relative to the
working directory as the datasets library reads them). Set HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1 to be
sure nothing is downloaded.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Union

from llama_jax.errors import EvalError

Tasks = Union[str, Sequence[str]]


def task_list(tasks: Tasks) -> List[str]:
    """"a,b" or ["a", "b"] -> ["a", "b"]; EvalError when empty."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    if not names:
        raise EvalError(f"tasks={tasks!r}: expected one or more lm-eval task names (e.g. hellaswag,arc_easy)")
    return names


def task_manager(tasks: Tasks, include_path: Optional[Union[str, Sequence[str]]] = None):
    """lm-eval's TaskManager that knows every name in `tasks` (globs allowed): the include path's tasks alone
    when they name them all (indexing lm-eval's ~15k built-in tasks takes seconds), else with the built-in
    ones. EvalError naming an unknown task (and the closest known names) or a missing folder."""
    from lm_eval.tasks import TaskManager

    names = task_list(tasks)
    paths = [include_path] if isinstance(include_path, str) else list(include_path or [])
    for path in paths:
        if not os.path.isdir(path):
            raise EvalError(f"include_path={path!r}: not a directory (expected a folder of lm-eval task YAMLs)")
    if paths:
        manager = TaskManager(include_path=paths, include_defaults=False)
        if not _unknown(manager, names):
            return manager
    manager = TaskManager(include_path=paths or None)
    unknown = _unknown(manager, names)
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        where = f" or in {', '.join(paths)}" if paths else ""
        raise EvalError(f"unknown lm-eval task {unknown[0]!r}: not among lm-eval's tasks{where}"
                        + (f"; did you mean {', '.join(close)}?" if close else ""))
    return manager


def _unknown(manager, names: List[str]) -> List[str]:
    return [n for n in names if not manager.match_tasks([n])]


def evaluate(lm, tasks: Tasks, *, limit: Optional[float] = None, include_path=None,
             num_fewshot: Optional[int] = None, log_samples: bool = False, bootstrap_iters: int = 100000,
             seed: int = 0) -> dict:
    """lm-eval's `simple_evaluate` on `lm` (a JaxLM): the results dict ("results" {task: {"acc,none": ...}},
    "configs", "n-samples", and "samples" with `log_samples`). `limit`: documents per task (a fraction when
    < 1); `bootstrap_iters`: resamples for the standard errors (0: none)."""
    import lm_eval

    names = task_list(tasks)
    if limit is not None and not limit > 0:
        raise EvalError(f"limit={limit}: expected a positive number of documents per task (or a fraction < 1)")
    manager = task_manager(names, include_path)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=names, limit=limit, num_fewshot=num_fewshot, task_manager=manager,
        log_samples=log_samples, bootstrap_iters=bootstrap_iters, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=None,  # our model draws with jax keys; seeding torch would only import it
        fewshot_random_seed=seed)
    if results is None:  # lm-eval returns None on the processes other than its rank 0
        raise EvalError("lm-eval returned no results (a process other than rank 0?)")
    return results


def scalars(results: dict) -> Dict[str, float]:
    """{"task/metric": value} of every metric (the ",none" filter name dropped; stderrs and counts left out)."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not numeric or "_stderr" in key or key == "sample_len":
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric}_{filt}"
            if math.isfinite(value):
                out[f"{task}/{name}"] = float(value)
    return out


def save_results(results: dict, path: str) -> str:
    """Write the results dict as JSON (lm-eval's own encoder for what JSON lacks); returns the path."""
    from lm_eval.utils import handle_non_serializable

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
    return path


def log_tensorboard(results: dict, logdir: str, step: int = 0) -> Dict[str, float]:
    """Write every metric as a TensorBoard scalar "lm_eval/task/metric" at `step`; returns them."""
    values = scalars(results)
    writer = _summary_writer()(logdir)
    try:
        for name, value in values.items():
            writer.add_scalar(f"lm_eval/{name}", value, step)
    finally:
        writer.close()
    return values


def _summary_writer():
    """tensorboardX's SummaryWriter without importing torch (tensorboardX imports it only to accept torch
    tensors, which costs seconds; blocking the import makes it take its no-torch path)."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def evaluate_params(config, params, tokenizer_dir: str, tasks: Tasks, *, mesh=None, limit=None, include_path=None,
                    batch_size: int = 8, workdir: Optional[str] = None, step: int = 0, say=print) -> dict:
    """Evaluate parameters in memory (the end of a training run): results printed, and with `workdir`
    saved as WORKDIR/eval_results.json and logged to WORKDIR/tensorboard at `step` (process 0)."""
    import jax
    from lm_eval.utils import make_table

    from llama_jax.eval.lm import JaxLM
    from llama_jax.sampling import Sampler
    from llama_jax.text.tokenizer import load_tokenizer

    lm = JaxLM(Sampler(config, params, load_tokenizer(tokenizer_dir), mesh=mesh, per_layer=False),
               batch_size=batch_size)
    results = evaluate(lm, tasks, limit=limit, include_path=include_path)
    if workdir and jax.process_index() == 0:
        save_results(results, os.path.join(workdir, "eval_results.json"))
        log_tensorboard(results, os.path.join(workdir, "tensorboard"), step)
    say(make_table(results))
    return results
