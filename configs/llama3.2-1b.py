"""Llama 3.2 1B from scratch on a TPU v5e-16 (16 chips, 16 GiB HBM each).

FSDP over the 16 chips: params + Adam state + grads = 16 bytes x 1.24B = 20 GB, 1.2 GB per chip. bf16 compute on
float32 master weights. 1M tokens per step (512 x 2048) as 8 accumulated micro-batches of 4 sequences per chip;
per chip and micro-batch: float32 logits 4 x 2048 x 128256 x 4 bytes = 4.2 GB (and as much for their gradient),
attention scores 4 x 32 heads x 2048^2 x 4 bytes = 2.1 GB per layer if held whole (attention runs in causal blocks
of 256 query rows), block inputs 0.5 GB (full remat). The ahead-of-time compile for v5e:4x4 (python -m
llama_jax.aot train --config configs/llama3.2-1b.py --topology v5e:4x4) gives 8.9 GiB per chip of 16. Tokenize
with a converted Llama 3.x checkpoint's tokenizer first:
    python -m llama_jax.data prepare --tokenizer ckpt/llama3.2-1b --out data/llama3 corpus/*.jsonl
"""

from llama_jax.training.run_config import MeshSection, ModelSection, OptimSection, RunConfig, DataSection


def get_config() -> RunConfig:
    return RunConfig(
        workdir="runs/llama3.2-1b", steps=50_000, batch_size=512, seq_len=2048, grad_accum=8, checkpoint_every=1000,
        keep_checkpoints=3, log_every=10, eval_every=1000, eval_batches=20, sample_tokens=0,
        model=ModelSection(preset="llama3.2-1b", dtype="bfloat16", param_dtype="float32", remat="full"),
        data=DataSection(path="data/llama3"),
        optim=OptimSection(lr=3e-4, min_lr_ratio=0.1, warmup_steps=2000, weight_decay=0.1, b2=0.95),
        mesh=MeshSection(data=1, fsdp=-1, tensor=1))
