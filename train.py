"""Train a Llama: `python train.py [--config configs/NAME.py] [key=value ...]`.

With no arguments: a small Llama on the built-in corpus (Python's standard-library docstrings), on CPU, in a
few minutes; it writes runs/default (checkpoints, metrics.jsonl, TensorBoard, export/) and prints a sample.
Run it again with the same workdir to resume from the latest checkpoint. See README "Training".
"""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="keys: workdir, steps, batch_size, seq_len, checkpoint_every, init_from, "
                                            "seed, mesh.AXIS (one size per mesh axis), optim.lr, lora.rank, "
                                            "model.preset, data.path, ... (see llama_jax/training/run_config.py)")
    parser.add_argument("--config", default="", help="a recipe file, e.g. configs/llama3.1-8b.py")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.add_argument("--no_progress", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.add_argument("--aot", default="", metavar="TOPOLOGY",
                        help="only compile the train step for a TPU slice, e.g. v5p:4x4x4 (no TPU needed; needs "
                             "libtpu), print per-chip memory, FLOPs and collectives; exit 1 if it does not fit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=100 mesh.fsdp=8")
    from llama_jax.parallel import distributed
    distributed.add_flags(parser)
    args = parser.parse_args(argv)

    from llama_jax.training import run_config
    try:
        cfg = run_config.build(args.config, args.overrides)
    except run_config.RunConfigError as e:
        sys.exit(f"error: {e}")
    if args.aot:
        from llama_jax import aot
        sys.exit(aot.train_cli(cfg, args.aot, args.config))

    distributed.initialize_from_args(args)

    from llama_jax.errors import LlamaJaxError
    from llama_jax.training import loop
    try:
        loop.train(cfg, progress=not args.no_progress)
    except LlamaJaxError as e:  # the user's inputs (paths, configs, data, checkpoints): one line, no traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    from llama_jax.cpu.host_memory import reexec_with_huge_pages
    from llama_jax.cpu.platform import cpu_unless_accelerator

    cpu_unless_accelerator()  # libtpu installed on a host without a TPU: no TPU probe (llama_jax/cpu/platform.py)
    reexec_with_huge_pages()  # huge pages for XLA:CPU's per-call buffers (see llama_jax/cpu/host_memory.py)
    main()
