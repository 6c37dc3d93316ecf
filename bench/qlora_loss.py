"""QLoRA against LoRA: the same adapters trained over an NF4 base and over a bf16 base, on the same data and
seed, through `train.py`'s trainer (`llama_jax.training.loop.train`). The base is a tiny model first trained
on the built-in corpus (so the adapters fine-tune something that has learnt), exported, then loaded by both
runs: `lora.base_quant=nf4` (QLoRA) and the bf16 base (LoRA); bf16 compute in both.

    python bench/qlora_loss.py                       # base 300 steps, adapters 300 steps
    python bench/qlora_loss.py --base-steps 20 --steps 10      # a smoke run

Prints one JSON line per run (train loss = mean of the last 20 logged steps, held-out loss at the end, base
weight bytes, seconds) and one with the differences, then a table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import common  # noqa: F401  (sets JAX_PLATFORMS before jax is imported)
from common import emit, machine, print_table

import jax

from llama_jax.model.quantize import tree_bytes
from llama_jax.training import loop as trainer
from llama_jax.training import run_config

COMMON = ["model.preset=tiny", "model.vocab_size=512", "batch_size=16", "seq_len=128", "sample_tokens=0",
          "eval_batches=8", "optim.warmup_steps=10"]


def _run(workdir: str, steps: int, *overrides) -> dict:
    cfg = run_config.build("", COMMON + [f"workdir={workdir}", f"steps={steps}", f"eval_every={steps}",
                                         f"checkpoint_every={steps}", *overrides])
    t0 = time.perf_counter()
    result = trainer.train(cfg, progress=False, sample=False)
    seconds = time.perf_counter() - t0
    from llama_jax.training.metrics import read_jsonl
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    losses = [r["loss"] for r in rows if "loss" in r]
    tail = losses[-20:]
    eval_loss = [r["eval_loss"] for r in rows if "eval_loss" in r][-1]
    frozen = result.state.frozen
    return {"train_loss": sum(tail) / len(tail), "eval_loss": eval_loss, "first_loss": losses[0],
            "base_bytes": tree_bytes(frozen) if frozen is not None else None, "seconds": seconds}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args()
    emit("machine", **machine())
    root = tempfile.mkdtemp(prefix="qlora_bench_")
    base = os.path.join(root, "base")
    rec = _run(base, args.base_steps, "optim.lr=3e-3")
    emit("qlora_loss", run="base (full training, float32)", steps=args.base_steps, **rec)

    lora = [f"init_from={base}", f"lora.rank={args.rank}", f"lora.alpha={2 * args.rank}", f"optim.lr={args.lr}",
            "lora.targets=q,k,v,o,gate,up,down", "optim.weight_decay=0", "model.dtype=bfloat16",
            "model.param_dtype=bfloat16", "data.train_split=train", "seed=1"]
    runs = {}
    for name, extra in (("LoRA, bf16 base", []), ("QLoRA, nf4 base", ["lora.base_quant=nf4"])):
        runs[name] = _run(os.path.join(root, name.split(",")[0].lower()), args.steps, *lora, *extra)
        emit("qlora_loss", run=name, steps=args.steps, **runs[name])
    a, b = runs["LoRA, bf16 base"], runs["QLoRA, nf4 base"]
    emit("qlora_loss", run="QLoRA - LoRA", train_loss_diff=b["train_loss"] - a["train_loss"],
         eval_loss_diff=b["eval_loss"] - a["eval_loss"], base_bytes_ratio=b["base_bytes"] / a["base_bytes"],
         devices=jax.device_count())
    print_table("QLoRA vs LoRA (tiny model, built-in corpus)")


if __name__ == "__main__":
    main()
