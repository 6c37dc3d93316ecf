"""The planner's arguments (`python -m llama_jax.aot plan`): an unknown topology, a global batch that is not whole
sequences, bad lists of remat policies, grad_accum values or meshes."""

from hostile import Case


def _plan(*args, topology="v5e:2x2"):
    def run(tmp):
        from llama_jax.aot.cli import main
        raise SystemExit(main(["plan", "--topology", topology, "model.preset=tiny", "seq_len=64", "batch_size=8",
                               *args]))
    return run


CASES = [
    Case("unknown topology", _plan(topology="v9x:2x2"), r"unknown TPU topology 'v9x:2x2'.*v5e:2x2"),
    Case("batch tokens not divisible by seq_len", _plan("--global-batch-tokens", "1000"),
         r"--global-batch-tokens 1000: expected a positive multiple of seq_len=64"),
    Case("unknown remat policy", _plan("--remat", "full,most"), r"--remat 'full,most': expected .*save_qkv_proj"),
    Case("grad_accum not integers", _plan("--grad-accum", "2,x"), r"--grad-accum '2,x': expected positive integers"),
    Case("mesh not covering the slice", _plan("--meshes", "1x2x1"), r"--meshes '1x2x1': expected .*product of 4"),
    Case("zero jobs", _plan("--jobs", "0"), r"--jobs 0: expected a positive number"),
]
