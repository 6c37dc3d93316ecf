"""Llama 2 7B on a TPU v4-32 (16 chips, 32 GiB HBM each).

FSDP over the 16 chips: params + Adam state + grads = 16 bytes x 6.7B = 108 GB, 6.7 GB per chip. bf16 compute. 1M
tokens per step (256 x 4096) as 8 accumulated micro-batches of 2 sequences per chip; per chip and micro-batch:
attention scores 2 x 32 heads x 4096^2 x 4 bytes = 4.3 GB per layer if held whole (attention runs in causal blocks
of 256 query rows), float32 logits 1.0 GB (and their gradient), block inputs 2.1 GB (full remat). The
ahead-of-time compile for v4:2x2x4 (jax sees 32 devices of 16 GiB) gives 7.7 GiB per device. Tokenize with a
converted Llama 2 checkpoint's SentencePiece tokenizer (vocab 32000):
    python -m llama_jax.data prepare --tokenizer ckpt/llama2-7b --out data/llama2 corpus/*.jsonl
"""

from llama_jax.training.run_config import DataSection, MeshSection, ModelSection, OptimSection, RunConfig


def get_config() -> RunConfig:
    return RunConfig(
        workdir="runs/llama2-7b", steps=100_000, batch_size=256, seq_len=4096, grad_accum=8,
        checkpoint_every=500, keep_checkpoints=3, log_every=10, eval_every=1000, eval_batches=10, sample_tokens=0,
        model=ModelSection(preset="llama2-7b", dtype="bfloat16", param_dtype="float32", remat="full"),
        data=DataSection(path="data/llama2"),
        optim=OptimSection(lr=3e-4, min_lr_ratio=0.1, warmup_steps=2000, weight_decay=0.1),
        mesh=MeshSection(data=1, fsdp=-1, tensor=1))
