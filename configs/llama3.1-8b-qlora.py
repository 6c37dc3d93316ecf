"""QLoRA of Llama 3.1 8B on ONE TPU v5e chip (16 GiB HBM): rank-16 adapters on every projection over a frozen
NF4 base (4-bit NormalFloat codes + one float32 absmax per 64 weights: 4.91 GiB instead of 14.96 GiB of bf16,
the bf16 token embedding included). Adapters and their Adam state in float32 (0.3 GiB); bf16 compute, the
base dequantized one layer at a time inside the layer scan. Sequences of 4096 tokens, one per micro-batch
(float32 logits 4096 x 128256 x 4 bytes = 2.1 GB, and as much for their gradient), 8 per step.
Ahead-of-time compile: python -m llama_jax.aot train --config configs/llama3.1-8b-qlora.py --topology v5e:1x1
(docs/TPU.md). Convert and tokenize first:
    python -m llama_jax.convert path/to/Llama-3.1-8B-Instruct ckpt/llama3.1-8b
    python -m llama_jax.data prepare --tokenizer ckpt/llama3.1-8b --out data/chat chat.jsonl
Note: the base is loaded in bf16 and quantized leaf by leaf, so loading needs the bf16 model (14.96 GiB) to fit
once; on a 16 GiB chip that is tight: convert/load on a larger host or slice if it does not.
"""

from llama_jax.training.run_config import (DataSection, LoraSection, MeshSection, ModelSection, OptimSection,
                                           RunConfig)


def get_config() -> RunConfig:
    return RunConfig(
        workdir="runs/llama3.1-8b-qlora", init_from="ckpt/llama3.1-8b", steps=2000, batch_size=8, seq_len=4096,
        grad_accum=8, checkpoint_every=200, keep_checkpoints=2, log_every=10, eval_every=200, eval_batches=4,
        sample_tokens=0,
        model=ModelSection(preset="llama3.1-8b", dtype="bfloat16", param_dtype="bfloat16", remat="full"),
        data=DataSection(path="data/chat"),
        optim=OptimSection(lr=2e-4, min_lr_ratio=0.1, warmup_steps=50, weight_decay=0.0),
        mesh=MeshSection(data=1, fsdp=-1, tensor=1),
        lora=LoraSection(rank=16, alpha=32.0, targets=("q", "k", "v", "o", "gate", "up", "down"), base_quant="nf4"))
