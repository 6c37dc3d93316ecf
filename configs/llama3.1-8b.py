"""Llama 3.1 8B on a TPU v5p-64 (32 chips, 95 GiB HBM each).

FSDP over the 32 chips: params + Adam state + grads = 16 bytes x 8.0B = 128 GB, 4 GB per chip. bf16 compute on
float32 master weights. 2M tokens per step (256 x 8192) as 4 accumulated micro-batches of 2 sequences per chip;
per chip and micro-batch: attention scores 2 x 32 heads x 8192^2 x 4 bytes = 17 GB per layer if held whole
(attention runs in causal blocks of 256 query rows), float32 logits 2 x 8192 x 128256 x 4 bytes = 8.4 GB (and
their gradient), block inputs 4.3 GB (full remat). The ahead-of-time compile for v5p:4x4x2 gives 28.5 GiB per chip
of 95. For continued pretraining or fine-tuning of the released model add init_from=ckpt/llama3.1-8b (a converted
checkpoint) and a lower optim.lr.
"""

from llama_jax.training.run_config import DataSection, MeshSection, ModelSection, OptimSection, RunConfig


def get_config() -> RunConfig:
    return RunConfig(
        workdir="runs/llama3.1-8b", steps=100_000, batch_size=256, seq_len=8192, grad_accum=4, checkpoint_every=500,
        keep_checkpoints=3, log_every=10, eval_every=1000, eval_batches=10, sample_tokens=0,
        model=ModelSection(preset="llama3.1-8b", dtype="bfloat16", param_dtype="float32", remat="full"),
        data=DataSection(path="data/llama3"),
        optim=OptimSection(lr=3e-4, min_lr_ratio=0.1, warmup_steps=2000, weight_decay=0.1),
        mesh=MeshSection(data=1, fsdp=-1, tensor=1))
