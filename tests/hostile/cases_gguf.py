"""GGUF files given to the converter (io/gguf.py, gguf_config.py, gguf_vocab.py) and the GGUF export's flags."""

import numpy as np

from hostile import Case


def _config(**overrides):
    from llama_jax.config import LlamaConfig

    return LlamaConfig.from_preset("tiny", num_layers=2, **overrides)


def _weights(config):
    from llama_jax.model import spec

    return {p.hf_name(i): np.zeros(p.hf_shape(config), np.float32) for p in spec.params(config)
            for i in (range(config.num_layers) if p.stacked else (None,))}


def _convert(tmp, path):
    from llama_jax.io.convert import main
    raise SystemExit(main([str(path), str(tmp / "dst"), "--no-progress"]))


def _gguf(edit=None, **write):
    """Convert a tiny GGUF written by gguf_util.write_gguf(**write), after `edit(path)` on its bytes."""
    def run(tmp):
        from gguf_util import write_gguf

        config = _config()
        path = tmp / "m.gguf"
        write_gguf(path, config, _weights(config), **write)
        if edit:
            edit(path)
        return _convert(tmp, path)
    return run


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4096])


def _wrong_magic(path):
    path.write_bytes(b"GGUX" + path.read_bytes()[4:])


def _empty(path):
    path.write_bytes(b"")
    return path


def _more_tensors_in_header(path):
    data = bytearray(path.read_bytes())
    data[8:16] = (int.from_bytes(data[8:16], "little") + 5).to_bytes(8, "little")  # tensor_count
    path.write_bytes(bytes(data))


def _q8_1_tensor():
    """One tensor stored as Q8_1 (a type llama.cpp uses for activations, never in model files)."""
    config = _config()
    raw = np.zeros((config.vocab_size, config.hidden_size // 32 * 40), np.uint8)
    return {"token_embd.weight": ("Q8_1", raw)}


def _to_gguf(*args):
    def run(tmp):
        from llama_jax.io.convert import main
        raise SystemExit(main(["--to-gguf", str(tmp / "ckpt"), str(tmp / "out.gguf"), "--no-progress", *args]))
    return run


def _bad_pre(w):
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(["a", "b"])


CASES = [
    Case("gguf: truncated file", _gguf(_truncate), r"m\.gguf: truncated"),
    Case("gguf: wrong magic", _gguf(_wrong_magic), r"not a GGUF file: it starts with b'GGUX'"),
    Case("gguf: empty file", lambda tmp: _convert(tmp, _empty(tmp / "e.gguf")), r"e\.gguf: not a GGUF file"),
    Case("gguf: missing file", lambda tmp: _convert(tmp, tmp / "none.gguf"), r"none\.gguf: no such file"),
    Case("gguf: unknown architecture", _gguf(arch="qwen2"), r"general\.architecture='qwen2'.*expected 'llama'"),
    Case("gguf: block_count above the tensors held", _gguf(meta={"llama.block_count": 3}),
         r"num_layers=3, but the checkpoint's files hold tensors for 2 layer"),
    Case("gguf: tensor count in the header above the tensors", _gguf(_more_tensors_in_header),
         r"m\.gguf: truncated or malformed GGUF file"),
    Case("gguf: a layer's tensor missing", _gguf(skip=("blk.1.ffn_up.weight",)),
         r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"),
    Case("gguf: unsupported tensor type", lambda tmp: _gguf(raw=_q8_1_tensor())(tmp),
         r"tensor 'token_embd\.weight' has type Q8_1, which llama_jax does not read"),
    Case("gguf: metadata key missing", _gguf(meta={"llama.embedding_length": None}),
         r"metadata key 'llama\.embedding_length' is missing"),
    Case("gguf: head count not a number", _gguf(meta={"llama.attention.head_count": "four"}),
         r"metadata llama\.attention\.head_count='four': expected a number"),
    Case("gguf: unknown BPE pre-tokenizer", _gguf(tokenizer=_bad_pre), r"tokenizer\.ggml\.pre='qwen2'"),
    Case("gguf: unknown --type", _to_gguf("--type", "q3"), r"--type 'q3': expected one of"),
    Case("gguf: export from a missing checkpoint", _to_gguf(), r"ckpt"),
]
