"""python -m llama_jax.eval and the run config's eval keys, given bad arguments (tests/test_eval.py has the rest)."""

from hostile import Case


def _cli(*args):
    def run(tmp):
        from llama_jax.eval.__main__ import main

        argv = ["--checkpoint", str(tmp), "--tasks", "llama_jax_tiny_mc", *args]
        raise SystemExit(main(argv))
    return run


def _missing_checkpoint(tmp):
    from llama_jax.eval.__main__ import main
    raise SystemExit(main(["--checkpoint", str(tmp / "nope"), "--tasks", "arc_easy"]))


def _empty_tasks(tmp):
    from llama_jax.eval.__main__ import main
    raise SystemExit(main(["--checkpoint", str(tmp), "--tasks", " , "]))


def _run_config(*overrides):
    def run(tmp):
        from llama_jax.training import run_config
        return run_config.build("", list(overrides))
    return run


CASES = [
    Case("eval checkpoint is missing", _missing_checkpoint, r"--checkpoint .*nope.*not a directory"),
    Case("eval batch size 0", _cli("--batch-size", "0"), r"--batch-size 0: expected a positive"),
    Case("eval limit 0", _cli("--limit", "0"), r"--limit 0.0: expected a positive"),
    Case("eval mesh names an unknown axis", _cli("--mesh", "rows=2"), r"unknown mesh axis \['rows'\]"),
    Case("eval mesh names make_mesh's own keyword", _cli("--mesh", "devices=2"), r"unknown mesh axis \['devices'\]"),
    Case("eval mesh size is not a number", _cli("--mesh", "x"), r"--mesh 'x': expected AXIS=N"),
    Case("eval task list is empty", _empty_tasks, r"tasks=' , ': expected one or more"),
    Case("eval include path is missing", _cli("--include-path", "/nonexistent/tasks"),
         r"include_path='/nonexistent/tasks': not a directory"),
    Case("run config eval_limit is negative", _run_config("eval_limit=-1"), r"eval_limit=-1.0: expected"),
]
