"""CPU LoRA fine-tune of what `python train.py` wrote (runs/default): rank-8 adapters on all projections.

    python train.py && python train.py --config configs/small-lora.py
"""

from llama_jax.training.run_config import LoraSection, OptimSection, RunConfig


def get_config() -> RunConfig:
    return RunConfig(
        workdir="runs/small-lora", init_from="runs/default", steps=60, checkpoint_every=30, eval_every=30,
        optim=OptimSection(lr=1e-3, warmup_steps=5, weight_decay=0.0),
        lora=LoraSection(rank=8, alpha=16.0, targets=("q", "k", "v", "o", "gate", "up", "down")))
