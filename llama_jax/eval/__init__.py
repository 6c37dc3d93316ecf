"""eval: lm-evaluation-harness (`lm-eval`) tasks on our model.

    lm.py        JaxLM, lm-eval's `LM` backend (loglikelihood, loglikelihood_rolling, generate_until), with
                 HFLM's tokenization and BOS rule
    scoring.py   the compiled scoring program: per-token log-probabilities in padded length buckets
    run.py       evaluate (task lookup, local YAMLs), results as JSON and TensorBoard, evaluate_params (the
                 end of a training run)
    __main__.py  python -m llama_jax.eval --checkpoint DIR --tasks TASKS [...]

Needs the `lm-eval` package (imported when this wing is).
"""

from llama_jax.eval.lm import JaxLM, adds_bos
from llama_jax.eval.run import evaluate, evaluate_params, log_tensorboard, save_results, scalars, task_manager
from llama_jax.eval.scoring import Scorer, token_scores

__all__ = ["JaxLM", "Scorer", "adds_bos", "evaluate", "evaluate_params", "log_tensorboard", "save_results",
           "scalars", "task_manager", "token_scores"]
