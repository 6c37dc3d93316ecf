"""Llama 3.1 405B on a TPU v5p-2048 (1024 chips, 95 GiB HBM each).

FSDP 128 x tensor 8 (heads 128, KV heads 8, MLP 53248, vocab 128256 all divide by 8): params + Adam state + grads
= 16 bytes x 406B = 6.5 TB, 6.3 GB per chip. bf16 compute. 2M tokens per step (256 x 8192) as 2 accumulated
micro-batches of one sequence per FSDP group; per chip and micro-batch: attention scores 16 heads x 8192^2 x 4
bytes = 4.3 GB per layer if held whole (attention runs in causal blocks of 256 query rows), logits 0.5 GB, block
inputs 8192 x 16384 x 2 bytes x 126 layers = 34 GB (full remat). The ahead-of-time compile for v5p:8x8x16 gives
46.1 GiB per chip of 95.
"""

from llama_jax.training.run_config import DataSection, MeshSection, ModelSection, OptimSection, RunConfig


def get_config() -> RunConfig:
    return RunConfig(
        workdir="runs/llama3.1-405b", steps=100_000, batch_size=256, seq_len=8192, grad_accum=2,
        checkpoint_every=100, keep_checkpoints=2, log_every=10, eval_every=1000, eval_batches=2, sample_tokens=0,
        model=ModelSection(preset="llama3.1-405b", dtype="bfloat16", param_dtype="float32", remat="full"),
        data=DataSection(path="data/llama3"),
        optim=OptimSection(lr=8e-5, min_lr_ratio=0.1, warmup_steps=4000, weight_decay=0.1),
        mesh=MeshSection(data=1, fsdp=128, tensor=8))
