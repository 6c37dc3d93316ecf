"""QLoRA of Llama 3.1 70B on a TPU v5e-8 (8 chips of 16 GiB): rank-16 adapters on every projection over a frozen
NF4 base (38.4 GiB for the whole model instead of 131.4 GiB of bf16; 4.8 GiB per chip). Adapters and their Adam
state in float32; bf16 compute, the base dequantized one layer at a time inside the layer scan. Sequences of
4096 tokens, 32 per step as 8 micro-batches of 4. Mesh fsdp 4 x tensor 2: with FSDP over all 8 chips (one
sequence per chip) the compiler needs 19.2 GB of temporaries (float32 logits of 4096 x 128256 and their
gradient, the 80 saved layer inputs, one gathered layer); splitting heads, MLP and vocabulary over 2 chips
brings the step to 15.21 of 16 GiB per chip (5% headroom).
Ahead-of-time compile: python -m llama_jax.aot train --config configs/llama3.1-70b-qlora.py --topology v5e:2x4
(docs/TPU.md). Caveat: start-up loads the bf16 model and quantizes it leaf by leaf, so the bf16 model (131 GiB)
must fit the slice once: it does on a v6e-8 (256 GiB; the step fits there with the default FSDP-8 mesh too),
not yet on a v5e-8 (128 GiB), where the step fits but the load does not (quantizing while reading is not done).
"""

from llama_jax.training.run_config import (DataSection, LoraSection, MeshSection, ModelSection, OptimSection,
                                           RunConfig)


def get_config() -> RunConfig:
    return RunConfig(
        workdir="runs/llama3.1-70b-qlora", init_from="ckpt/llama3.1-70b", steps=1000, batch_size=32, seq_len=4096,
        grad_accum=8, checkpoint_every=100, keep_checkpoints=2, log_every=10, eval_every=100, eval_batches=4,
        sample_tokens=0,
        model=ModelSection(preset="llama3.1-70b", dtype="bfloat16", param_dtype="bfloat16", remat="full"),
        data=DataSection(path="data/chat"),
        optim=OptimSection(lr=1e-4, min_lr_ratio=0.1, warmup_steps=30, weight_decay=0.0),
        mesh=MeshSection(data=1, fsdp=4, tensor=2),
        lora=LoraSection(rank=16, alpha=32.0, targets=("q", "k", "v", "o", "gate", "up", "down"), base_quant="nf4"))
