"""Llama 3.2 Vision checkpoints where a format cannot hold them (GGUF out, Meta .pth in), and Hugging Face Mllama
directories whose files do not match their config.json (a missing cross layer, layer counts the files lack)."""

from hostile import Case
from hostile.fixtures import write_json


def _mllama_dir(directory, drop=(), **text_overrides):
    """A Hugging Face Mllama directory of tiny-vision (zero weights, no torch): config.json + model.safetensors;
    `drop` leaves tensors out, `text_overrides` change config.json's text_config only."""
    import numpy as np

    from llama_jax.config import LlamaConfig
    from llama_jax.io.safetensors_io import write_arrays
    from llama_jax.model import spec

    config = LlamaConfig.from_preset("tiny-vision")
    d = config.to_hf_dict()
    d["text_config"].update(text_overrides)
    write_json(directory / "config.json", d)
    arrays = [(p.hf_name(i), np.zeros(p.hf_shape(config), np.float32)) for p in spec.params(config)
              for i in p.hf_layers(config) if p.hf_name(i) not in drop]
    write_arrays(str(directory / "model.safetensors"), arrays)
    return directory


def _convert(tmp, src, *flags):
    from llama_jax.io.convert import main
    raise SystemExit(main([*flags, str(src), str(tmp / "dst"), "--no-progress"]))


def _vision_checkpoint_to_gguf(tmp):
    """Only llama_jax.json is read before the refusal: a metadata-only checkpoint is enough."""
    from llama_jax.config import LlamaConfig
    from llama_jax.io.checkpoint import write_metadata

    (tmp / "ckpt" / "params").mkdir(parents=True)
    write_metadata(str(tmp / "ckpt"), LlamaConfig.from_preset("tiny-vision"), "float32")
    from llama_jax.io.convert import main
    raise SystemExit(main(["--to-gguf", str(tmp / "ckpt"), str(tmp / "out.gguf"), "--no-progress"]))


def _meta_vision(tmp):
    write_json(tmp / "src" / "params.json", {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 256,
                                             "vision_chunk_size": 560, "vision_max_num_chunks": 4})
    (tmp / "src" / "consolidated.00.pth").write_bytes(b"")
    return _convert(tmp, tmp / "src")


CROSS_Q = "language_model.model.layers.1.cross_attn.q_proj.weight"

CASES = [
    Case("vision checkpoint to GGUF", _vision_checkpoint_to_gguf, r"Llama 3\.2 Vision.*GGUF.*--to-hf"),
    Case("Meta .pth of a vision model", _meta_vision, r"params\.json.*vision_chunk_size.*Hugging Face"),
    Case("mllama dir missing a cross-attention tensor",
         lambda tmp: _convert(tmp, _mllama_dir(tmp / "src", drop=(CROSS_Q,))), r"missing tensor.*cross_attn\.q_proj"),
    Case("mllama config puts the cross layer where a self layer is",
         lambda tmp: _convert(tmp, _mllama_dir(tmp / "src", cross_attention_layers=[0])),
         r"unknown tensor name .*layers\.0\.self_attn.*cross_attention_layers=\[0\]"),
    Case("mllama config claims more text layers than the files hold",
         lambda tmp: _convert(tmp, _mllama_dir(tmp / "src", num_hidden_layers=1000)),
         r"num_layers \+ cross_attention_layers=1000.*hold tensors for 3"),
]
