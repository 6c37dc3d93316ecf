"""Llama 3.1 70B on a TPU v5p-512 (256 chips, 95 GiB HBM each).

FSDP 64 x tensor 4 (heads 64, KV heads 8, MLP 28672 and vocab 128256 all divide by 4; tensor stays inside a 4-chip
host): params + Adam state + grads = 16 bytes x 70.6B = 1.13 TB, 4.4 GB per chip. bf16 compute. 4M tokens per step
(512 x 8192) as 4 accumulated micro-batches of 2 sequences per FSDP group; per chip and micro-batch: attention
scores 2 x 16 heads x 8192^2 x 4 bytes = 8.6 GB per layer if held whole (attention runs in causal blocks of 256
query rows), logits 2.1 GB, block inputs 2 x 8192 x 8192 x 2 bytes x 80 layers = 21 GB (full remat). The
ahead-of-time compile for v5p:4x8x8 gives 36.9 GiB per chip of 95.
"""

from llama_jax.training.run_config import DataSection, MeshSection, ModelSection, OptimSection, RunConfig


def get_config() -> RunConfig:
    return RunConfig(
        workdir="runs/llama3.1-70b", steps=100_000, batch_size=512, seq_len=8192, grad_accum=4, checkpoint_every=250,
        keep_checkpoints=2, log_every=10, eval_every=1000, eval_batches=5, sample_tokens=0,
        model=ModelSection(preset="llama3.1-70b", dtype="bfloat16", param_dtype="float32", remat="full"),
        data=DataSection(path="data/llama3"),
        optim=OptimSection(lr=1.5e-4, min_lr_ratio=0.1, warmup_steps=2000, weight_decay=0.1),
        mesh=MeshSection(data=1, fsdp=64, tensor=4))
