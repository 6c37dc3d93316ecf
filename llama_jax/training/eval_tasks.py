"""lm-eval tasks at the end of a run (`eval_tasks=arc_easy,hellaswag`, `eval_limit=`, `eval_include_path=`):
checked before the first step (a misspelt task fails now, not after the run), then run on the final params
(LoRA merged into its base) after the export, through llama_jax.eval on the run's mesh. The metrics go to
WORKDIR/tensorboard (as lm_eval/TASK/METRIC at the final step) and WORKDIR/eval_results.json."""

from __future__ import annotations

from llama_jax.errors import EvalError, TrainError


def check(setup) -> None:
    """TrainError unless the run can evaluate its tasks: a tokenizer, lm-eval installed, known task names."""
    cfg = setup.cfg
    if not setup.tokenizer_path:
        raise TrainError(f"eval_tasks={','.join(cfg.eval_tasks)}: the run has no tokenizer to evaluate with; "
                         f"data.path={cfg.data.path!r} must hold the tokenizer files")
    try:
        from llama_jax.eval.run import task_manager
    except ImportError as e:
        raise TrainError(f"eval_tasks needs the lm-eval package ({e}); pip install lm-eval") from None
    try:
        task_manager(cfg.eval_tasks, cfg.eval_include_path or None)
    except EvalError as e:
        raise TrainError(f"eval_tasks: {e}") from None


def run(setup, state, lora: bool, say=print) -> dict:
    """Evaluate the final `state` of the run on its eval_tasks; returns lm-eval's results dict. Every
    process calls it (the scoring program runs on the whole mesh); process 0 writes the files."""
    from llama_jax.eval.run import evaluate_params
    from llama_jax.training import lora as lora_lib

    cfg = setup.cfg
    # merged as export_run merges (a QLoRA base dequantized into the run's param dtype): the export's weights
    params = state.params if not lora else lora_lib.merge(state.frozen, state.params, cfg.lora.alpha,
                                                          setup.model.param_dtype)
    limit = cfg.eval_limit if 0 < cfg.eval_limit < 1 else (int(cfg.eval_limit) or None)
    return evaluate_params(setup.model, params, setup.tokenizer_path, cfg.eval_tasks, mesh=setup.mesh,
                           limit=limit, include_path=cfg.eval_include_path or None,
                           batch_size=cfg.batch_size // cfg.grad_accum, workdir=cfg.workdir, step=int(state.step),
                           say=say)
