"""DPO of Llama 3.2 1B Instruct with LoRA: the reference model is the frozen base without its adapters (no second
copy of the weights), computed in the same step. 64 sequences per step = 32 (chosen, rejected) pairs of up to
1024 tokens, 8 micro-batches of 4 pairs; beta 0.1 as in the DPO paper. Fits one TPU v5e chip (compiled ahead of
time: 10.43 of 16 GiB, 7.94 GiB of it temporaries; with 2 micro-batches the compiler wants 20.4 GB) or a GPU:
    python train.py --config configs/llama3.2-1b-dpo.py --aot v5e:1x1
add lora.base_quant=nf4 for a 4-bit base. Prepare the pairs with the model's own tokenizer (its chat template):
    python -m llama_jax.convert path/to/Llama-3.2-1B-Instruct ckpt/llama3.2-1b-instruct
    python -m llama_jax.data prepare --tokenizer ckpt/llama3.2-1b-instruct --out data/prefs prefs.jsonl
where each line of prefs.jsonl is {"prompt": ..., "chosen": ..., "rejected": ...} (or chat "messages" +
"chosen"/"rejected"). Then: python train.py --config configs/llama3.2-1b-dpo.py [dpo.beta=0.2 ...]
Metrics (metrics.jsonl, TensorBoard): loss, reward_margin, reward_accuracy, logps_chosen/rejected.
"""

from llama_jax.training.run_config import (DataSection, DpoSection, LoraSection, MeshSection, ModelSection,
                                           OptimSection, RunConfig)


def get_config() -> RunConfig:
    return RunConfig(
        workdir="runs/llama3.2-1b-dpo", init_from="ckpt/llama3.2-1b-instruct", objective="dpo", steps=1000,
        batch_size=64, seq_len=1024, grad_accum=8, checkpoint_every=200, keep_checkpoints=2, log_every=10,
        eval_every=200, eval_batches=4, sample_tokens=64, sample_prompt="Explain DPO in one sentence.",
        model=ModelSection(preset="llama3.2-1b", dtype="bfloat16", param_dtype="bfloat16", remat="full"),
        data=DataSection(path="data/prefs"),
        optim=OptimSection(lr=5e-5, min_lr_ratio=0.1, warmup_steps=50, weight_decay=0.0),
        mesh=MeshSection(data=1, fsdp=-1, tensor=1),
        lora=LoraSection(rank=16, alpha=32.0, targets=("q", "k", "v", "o", "gate", "up", "down")),
        dpo=DpoSection(beta=0.1))
