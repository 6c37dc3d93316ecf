"""`python -m llama_jax.eval --checkpoint DIR --tasks TASKS [--limit N] [--batch-size B] [--output FILE]
[--include-path DIR] [--log-dir DIR] ...`: lm-evaluation-harness tasks on a llama_jax checkpoint (or a Hugging
Face / Meta directory, or a training workdir). See README "Evaluate"."""

from __future__ import annotations

import argparse
import sys

from llama_jax.errors import EvalError, LlamaJaxError


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m llama_jax.eval", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="llama_jax checkpoint, training workdir, or HF/Meta directory")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (globs allowed)")
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction when < 1)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per compiled model call (default 8)")
    p.add_argument("--output", default=None, help="write the results as JSON to this file")
    p.add_argument("--include-path", action="append", default=None,
                   help="a folder of local lm-eval task YAMLs (repeatable)")
    p.add_argument("--log-dir", default=None, help="also write the metrics as TensorBoard scalars here")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--log-samples", action="store_true", help="keep every request and response in --output")
    p.add_argument("--bootstrap-iters", type=int, default=100000, help="resamples for the stderrs (0: none)")
    p.add_argument("--dtype", default=None, help="cast weights and compute, e.g. bfloat16 (default: as stored)")
    p.add_argument("--max-length", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                   help="split the model and batch over devices, e.g. " + _mesh_example())
    return p.parse_args(argv)


def _mesh_example() -> str:
    from llama_jax.parallel.sharding import MESH_AXES
    return ",".join(f"{a}={n}" for a, n in zip(MESH_AXES, (1, 2, 4)))


def build_mesh(text):
    """"axis=n,..." -> a mesh (make_mesh(**sizes)), or None."""
    if not text:
        return None
    from llama_jax.parallel.sharding import make_mesh

    sizes = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            sizes[name.strip()] = int(value)
        except ValueError:
            raise EvalError(f"--mesh {text!r}: expected AXIS=N pairs, e.g. {_mesh_example()}") from None
    from llama_jax.parallel.sharding import MESH_AXES

    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:  # make_mesh's own keywords (devices=) must not be reachable from the command line
        raise EvalError(f"--mesh {text!r}: unknown mesh axis {unknown}; expected AXIS=N with AXIS in "
                        f"{', '.join(MESH_AXES)}, e.g. {_mesh_example()}")
    return make_mesh(**sizes)  # a MeshError names sizes that do not fit the devices


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        print(f"error: python -m llama_jax.eval needs lm-evaluation-harness ({e}); pip install lm-eval",
              file=sys.stderr)
        return 1
    try:
        import os

        from llama_jax.eval.lm import JaxLM
        from llama_jax.eval.run import evaluate, log_tensorboard, save_results, task_list, task_manager

        if not os.path.isdir(args.checkpoint):
            raise EvalError(f"--checkpoint {args.checkpoint!r}: not a directory (expected a llama_jax checkpoint, "
                            "a training workdir, or a Hugging Face / Meta model directory)")
        if args.batch_size < 1:
            raise EvalError(f"--batch-size {args.batch_size}: expected a positive number of rows")
        if args.limit is not None and not args.limit > 0:
            raise EvalError(f"--limit {args.limit}: expected a positive number of documents (a fraction when < 1)")
        limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
        mesh = build_mesh(args.mesh)
        task_manager(task_list(args.tasks), args.include_path)  # unknown names fail before the model loads
        lm = JaxLM.load(args.checkpoint, mesh=mesh, dtype=args.dtype, batch_size=args.batch_size,
                        max_length=args.max_length)
        results = evaluate(lm, args.tasks, limit=limit, include_path=args.include_path,
                           num_fewshot=args.num_fewshot, log_samples=args.log_samples,
                           bootstrap_iters=args.bootstrap_iters)
    except LlamaJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from lm_eval.utils import make_table

    print(make_table(results))
    if args.output:
        print(f"results: {save_results(results, args.output)}")
    if args.log_dir:
        log_tensorboard(results, args.log_dir)
        print(f"TensorBoard: {args.log_dir}")
    return 0


if __name__ == "__main__":
    from llama_jax.cpu.platform import cpu_unless_accelerator

    cpu_unless_accelerator()  # libtpu installed on a host without a TPU: no TPU probe (llama_jax/cpu/platform.py)
    sys.exit(main())
