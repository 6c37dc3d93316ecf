"""hf:// model names and --push-to-hub, given bad names (tests/test_hub.py has the offline cache, gated and missing
models)."""

from hostile import Case


def _load(name):
    def run(tmp):
        import llama_jax
        return llama_jax.load(name)
    return run


def _convert(*args):
    def run(tmp):
        from llama_jax.io.convert import main
        raise SystemExit(main([*args, str(tmp / "src"), str(tmp / "dst"), "--no-progress"]))
    return run


CASES = [
    Case("hf:// name without an org", _load("hf://just-a-name"), r"hf://just-a-name: not a Hub model name.*ORG/NAME"),
    Case("hf:// name with an empty revision", _load("hf://org/name@"), r"hf://org/name@: not a Hub model name"),
    Case("--push-to-hub without --to-hf", _convert("--push-to-hub", "me/model"), r"--push-to-hub needs --to-hf"),
    Case("--push-to-hub with a bad repo name", _convert("--to-hf", "--push-to-hub", "not a repo"),
         r"--push-to-hub 'not a repo': expected a repository name ORG/NAME"),
]
