"""Named configs: every released Llama, with the values of its published `config.json`, and small presets
for tests and demos. Values only; `LlamaConfig.from_preset` builds and validates them."""

_LLAMA1 = dict(vocab_size=32000, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
               bos_token_id=1, eos_token_id=(2,))
_LLAMA2 = dict(vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
               bos_token_id=1, eos_token_id=(2,))
_CODELLAMA = dict(_LLAMA2, vocab_size=32016, rope_theta=1e6, max_position_embeddings=16384)
_LLAMA3 = dict(vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
               bos_token_id=128000, eos_token_id=(128001,))
_LLAMA31_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192)
_LLAMA31 = dict(_LLAMA3, max_position_embeddings=131072, rope_scaling=_LLAMA31_SCALING)
_LLAMA32 = dict(_LLAMA31, tie_word_embeddings=True, rope_scaling=dict(_LLAMA31_SCALING, factor=32.0))

# Llama 3.2 Vision: a Llama 3.1 text model (num_layers counts its self-attention layers) with a gated
# cross-attention layer before every fourth of them (Hugging Face numbering: 3, 8, 13, ...), and the ViT-H/14
# encoder of VisionConfig's defaults (560-pixel tiles: the released config.json files; llama_models' sku_list
# says 448 for the 11B base, which its own image transform and the Hub's config do not use).
_VISION = dict(_LLAMA31, vision={}, image_token_id=128256)


def _cross(total):
    return tuple(range(3, total, 5))


# (hidden, intermediate, layers, heads, kv heads)
def _shape(d, f, layers, heads, kv):
    return dict(hidden_size=d, intermediate_size=f, num_layers=layers, num_heads=heads, num_kv_heads=kv)


PRESETS = {
    "llama1-7b": dict(_LLAMA1, **_shape(4096, 11008, 32, 32, 32)),
    "llama1-13b": dict(_LLAMA1, **_shape(5120, 13824, 40, 40, 40)),
    "llama1-33b": dict(_LLAMA1, **_shape(6656, 17920, 60, 52, 52)),
    "llama1-65b": dict(_LLAMA1, rms_norm_eps=1e-5, **_shape(8192, 22016, 80, 64, 64)),
    "llama2-7b": dict(_LLAMA2, **_shape(4096, 11008, 32, 32, 32)),
    "llama2-13b": dict(_LLAMA2, **_shape(5120, 13824, 40, 40, 40)),
    "llama2-70b": dict(_LLAMA2, **_shape(8192, 28672, 80, 64, 8)),
    "codellama-7b": dict(_CODELLAMA, **_shape(4096, 11008, 32, 32, 32)),
    "codellama-13b": dict(_CODELLAMA, **_shape(5120, 13824, 40, 40, 40)),
    "codellama-34b": dict(_CODELLAMA, vocab_size=32000, **_shape(8192, 22016, 48, 64, 8)),
    "codellama-70b": dict(_CODELLAMA, **_shape(8192, 28672, 80, 64, 8)),
    # Code Llama Python (7B/13B) was not trained to infill: no infilling tokens, vocab 32000; Instruct keeps them.
    "codellama-7b-python": dict(_CODELLAMA, vocab_size=32000, **_shape(4096, 11008, 32, 32, 32)),
    "codellama-7b-instruct": dict(_CODELLAMA, **_shape(4096, 11008, 32, 32, 32)),
    "codellama-13b-python": dict(_CODELLAMA, vocab_size=32000, **_shape(5120, 13824, 40, 40, 40)),
    "codellama-13b-instruct": dict(_CODELLAMA, **_shape(5120, 13824, 40, 40, 40)),
    "codellama-34b-python": dict(_CODELLAMA, vocab_size=32000, **_shape(8192, 22016, 48, 64, 8)),
    "codellama-34b-instruct": dict(_CODELLAMA, vocab_size=32000, **_shape(8192, 22016, 48, 64, 8)),
    "codellama-70b-python": dict(_CODELLAMA, **_shape(8192, 28672, 80, 64, 8)),
    "codellama-70b-instruct": dict(_CODELLAMA, **_shape(8192, 28672, 80, 64, 8)),
    # Llama Guard: llama_models.sku_list's arch_args (Guard 3 8B and Guard 2 8B: use_scaled_rope False). Guard 2
    # is a Llama 3 8B with the Llama 3 tokenizer: vocab 128256 as its config.json (sku_list's 32000 is a slip).
    "llama-guard-3-1b": dict(_LLAMA32, head_dim=64, **_shape(2048, 8192, 16, 32, 8)),
    "llama-guard-3-8b": dict(_LLAMA31, rope_scaling=None, **_shape(4096, 14336, 32, 32, 8)),
    "llama-guard-2-8b": dict(_LLAMA3, **_shape(4096, 14336, 32, 32, 8)),
    "llama3-8b": dict(_LLAMA3, **_shape(4096, 14336, 32, 32, 8)),
    "llama3-70b": dict(_LLAMA3, **_shape(8192, 28672, 80, 64, 8)),
    "llama3.1-8b": dict(_LLAMA31, **_shape(4096, 14336, 32, 32, 8)),
    "llama3.1-70b": dict(_LLAMA31, **_shape(8192, 28672, 80, 64, 8)),
    "llama3.1-405b": dict(_LLAMA31, **_shape(16384, 53248, 126, 128, 8)),
    "llama3.2-1b": dict(_LLAMA32, head_dim=64, **_shape(2048, 8192, 16, 32, 8)),
    "llama3.2-3b": dict(_LLAMA32, head_dim=128, **_shape(3072, 8192, 28, 24, 8)),
    "llama3.3-70b": dict(_LLAMA31, eos_token_id=(128001, 128008, 128009), **_shape(8192, 28672, 80, 64, 8)),
    "llama3.2-11b-vision": dict(_VISION, cross_attention_layers=_cross(40), **_shape(4096, 14336, 32, 32, 8)),
    "llama3.2-11b-vision-instruct": dict(_VISION, cross_attention_layers=_cross(40),
                                         eos_token_id=(128001, 128008, 128009), **_shape(4096, 14336, 32, 32, 8)),
    "llama3.2-90b-vision": dict(_VISION, cross_attention_layers=_cross(100), **_shape(8192, 28672, 80, 64, 8)),
    "llama3.2-90b-vision-instruct": dict(_VISION, cross_attention_layers=_cross(100),
                                         eos_token_id=(128001, 128008, 128009), **_shape(8192, 28672, 80, 64, 8)),
    "llama-guard-3-11b-vision": dict(_VISION, cross_attention_layers=_cross(40),
                                     eos_token_id=(128001, 128008, 128009), **_shape(4096, 14336, 32, 32, 8)),
    # Small presets: tests (tiny), the CPU demo trained by `python train.py` (small), benchmarks.
    "tiny": dict(vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                 bos_token_id=1, eos_token_id=(2,), **_shape(64, 128, 2, 4, 2)),
    # tiny's text model with a cross-attention layer between its two self layers and a 2-layer ViT over 28-pixel
    # tiles of 2x2 patches (tests).
    "tiny-vision": dict(vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                        bos_token_id=1, eos_token_id=(2,), cross_attention_layers=(1,), image_token_id=256,
                        vision=dict(hidden_size=32, intermediate_size=64, num_layers=4, num_global_layers=2,
                                    num_heads=4, image_size=28, patch_size=14, intermediate_layers_indices=(1, 3),
                                    vision_output_dim=96),
                        **_shape(64, 128, 2, 4, 2)),
    "small": dict(vocab_size=2048, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                  bos_token_id=1, eos_token_id=(2,), **_shape(256, 704, 4, 8, 4)),
    "bench-20m": dict(vocab_size=8192, max_position_embeddings=2048, bos_token_id=1, eos_token_id=(2,),
                      **_shape(384, 1024, 8, 6, 6)),  # 20.4M parameters
    "bench-120m": dict(vocab_size=32000, max_position_embeddings=2048, bos_token_id=1, eos_token_id=(2,),
                       **_shape(768, 2048, 10, 12, 12)),  # 119.9M parameters
    "bench-135m": dict(vocab_size=49152, max_position_embeddings=2048, bos_token_id=1, eos_token_id=(2,),
                       tie_word_embeddings=True, **_shape(576, 1536, 30, 9, 3)),
}
