"""`python -m llama_jax.aot train|sample|plan`, `train.py --aot` and `sample.py --aot`: print a report; exit
status 0 if it fits, 1 if not, 2 on bad input (`plan`: llama_jax.aot.plan_report)."""

from __future__ import annotations

import argparse
import os
import sys

import jax

from llama_jax.aot import plan_report
from llama_jax.aot.report import format_does_not_fit, format_sample, format_train
from llama_jax.aot.sample_report import compile_sample
from llama_jax.aot.topology import valid_topologies
from llama_jax.aot.train_report import compile_train
from llama_jax.errors import AotError, DoesNotFit


def cpu_host():
    """Compile-only runs need no accelerator: keep jax on the CPU (skips libtpu's TPU probe and its lock)."""
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")


def train_cli(run_config, topology: str, recipe: str = "") -> int:
    """`train.py --aot TOPOLOGY`: print the report; exit status 0 if it fits, 1 if not, 2 on bad input."""
    cpu_host()
    try:
        report = compile_train(run_config, topology, recipe)
    except AotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DoesNotFit as e:
        print(format_does_not_fit(e, recipe or "train step", topology))
        return 1
    print(format_train(report))
    return 0 if report.fits else 1


def sample_cli(name: str, topology: str, **kw) -> int:
    """`sample.py --aot TOPOLOGY`: exit status 0 if prefill and decode fit, 1 if not, 2 on bad input."""
    cpu_host()
    try:
        report = compile_sample(name, topology, **kw)
    except AotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_sample(report))
    return 0 if report.fits else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Compile train/sample steps for a TPU slice without a TPU; plan runs.")
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train", help="the train step of a recipe")
    t.add_argument("--config", default="", help="a recipe file, e.g. configs/llama3.1-8b.py")
    t.add_argument("--topology", required=True, help=f"e.g. v5p:4x4x4 ({valid_topologies()})")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. mesh.tensor=4")
    s = sub.add_parser("sample", help="prefill + one decode step")
    s.add_argument("--checkpoint-config", required=True, help="a preset name, e.g. llama3.1-8b")
    s.add_argument("--topology", required=True)
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--context", type=int, default=8192, help="KV cache length (prompt + new tokens)")
    s.add_argument("--prompt", type=int, default=0, help="prefill length (default: context / 4)")
    s.add_argument("--int8", action="store_true", help="int8 weights (llama_jax.model.quantize)")
    s.add_argument("--tensor", type=int, default=-1, help="tensor-parallel size (default: all devices)")
    s.add_argument("--attention", default="auto", choices=("auto", "xla", "splash"),
                   help="the prefill's attention (auto: the splash kernel on a TPU)")
    s.add_argument("--decode-attention", default="auto", choices=("auto", "xla", "paged"),
                   help="the decode step's attention (auto: the Pallas paged kernel on a TPU, bf16 cache)")
    plan_report.add_parser(sub)
    args = parser.parse_args(argv)
    if args.what == "plan":
        return plan_report.plan_cli(args)
    if args.what == "train":
        from llama_jax.training import run_config
        try:
            cfg = run_config.build(args.config, args.overrides)
        except run_config.RunConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return train_cli(cfg, args.topology, args.config)
    return sample_cli(args.checkpoint_config, args.topology, batch=args.batch, context=args.context,
                      prompt=args.prompt, int8=args.int8, tensor=args.tensor, attention=args.attention,
                      decode_attention=args.decode_attention)
