"""Llama 3.2 11B Vision: fine-tune the text side (self- and cross-attention layers, embedding, head) with the image
encoder and projector frozen, on a TPU v5p-8 (v5p:2x2x1: 4 chips, 95 GiB HBM each).

Frozen (training/optim.py `freeze_image_encoder`): the loss stops gradients at the encoder and projector, so
their backward pass is never built, and they get no update and no Adam moments. Text side 9.78B parameters:
float32 master weights + Adam + gradients = 16 bytes x 9.78B = 156 GB; the frozen encoder and projector 0.9B
x 4 bytes = 3.6 GB: 40 GB per chip under FSDP over the 4 chips. bf16 compute. A batch of 32 sequences of 2048
tokens as 8 accumulated micro-batches of one sequence per chip, each row with one image of 4 tiles (the step
takes the processor's arrays; see training/step.py): per chip and micro-batch, float32 logits 2048 x 128256 x
4 bytes = 1.05 GB (and their gradient), the encoder's forward over 4 x 1601 image tokens (not kept), and each
of the 8 cross-attention layers' scores 32 heads x 2048 x 6432 image tokens x 4 bytes = 1.7 GB, (the cross layers
are rematerialised under model.remat as the self layers are; doing so changed neither figure here). With 4096-token
sequences the TPU compiler refuses the step by 80 MB (95.81 of 95.73 GB). Compiled ahead
of time for v5p:2x2x1: 70.79 GiB per chip of 95 (42.07 GiB temporaries); on v6e-8 one row's temporaries
(48 GB) exceed a chip's 32 GiB (docs/TPU.md, "Llama 3.2 Vision"):
    python train.py --config configs/llama3.2-11b-vision.py --aot v5p:2x2x1
Convert the released model and tokenize first (train.py's data rows are text: the compiled step is the one a
batch with images runs, the memory bound; a text batch runs the text model alone):
    python -m llama_jax.convert path/to/Llama-3.2-11B-Vision-Instruct ckpt/llama3.2-11b-vision
    python -m llama_jax.data prepare --tokenizer ckpt/llama3.2-11b-vision --out data/chat chat.jsonl
"""

from llama_jax.training.run_config import DataSection, MeshSection, ModelSection, OptimSection, RunConfig


def get_config() -> RunConfig:
    return RunConfig(
        workdir="runs/llama3.2-11b-vision", init_from="ckpt/llama3.2-11b-vision", steps=2000, batch_size=32,
        seq_len=2048, grad_accum=8, checkpoint_every=200, keep_checkpoints=2, log_every=10, eval_every=200,
        eval_batches=4, sample_tokens=0,
        model=ModelSection(preset="llama3.2-11b-vision", dtype="bfloat16", param_dtype="float32", remat="full"),
        data=DataSection(path="data/chat"),
        optim=OptimSection(lr=1e-5, min_lr_ratio=0.1, warmup_steps=50, weight_decay=0.0),
        mesh=MeshSection(data=1, fsdp=-1, tensor=1))
