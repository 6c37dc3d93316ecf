"""Checkpoint sources given to the converter and loader: safetensors headers and offsets, the index, config.json
values, symlinked tokenizer files, a Meta directory without torch, a full disk."""

import errno
import os

from hostile import Case
from hostile.fixtures import safetensors_file, tiny_hf_dir, write_json

F32x2 = {"dtype": "F32", "shape": [2]}


def _header(header, data_bytes=64):
    """Open one safetensors file with `header`, as the converter's reader does."""
    def run(tmp):
        from llama_jax.io.safetensors_io import SafetensorsFile
        return SafetensorsFile(str(safetensors_file(tmp / "model.safetensors", header, data_bytes)))
    return run


def _convert(tmp, src):
    from llama_jax.io.convert import main
    raise SystemExit(main([str(src), str(tmp / "dst"), "--no-progress"]))


def _config(**overrides):
    """Convert a tiny HF directory whose config.json has `overrides`."""
    return lambda tmp: _convert(tmp, tiny_hf_dir(tmp / "src", **overrides))


def _weight_map(value):
    def run(tmp):
        src = tiny_hf_dir(tmp / "src")
        write_json(src / "model.safetensors.index.json", {"weight_map": value})
        return _convert(tmp, src)
    return run


def _linked(name):
    """A tokenizer file that is a symlink to a file outside the source folder."""
    def run(tmp):
        src = tiny_hf_dir(tmp / "src")
        (tmp / "secret.txt").write_text("not yours")
        os.symlink(tmp / "secret.txt", src / name)
        return _convert(tmp, src)
    return run


def _meta_without_torch(tmp):
    import sys
    from unittest import mock

    write_json(tmp / "src" / "params.json", {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 256})
    (tmp / "src" / "consolidated.00.pth").write_bytes(b"")
    with mock.patch.dict(sys.modules, {"torch": None}):  # `import torch` raises ImportError
        return _convert(tmp, tmp / "src")


def _disk_full(tmp):
    from unittest import mock

    from llama_jax.io import checkpoint

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with mock.patch.object(checkpoint.ParamsWriter, "write", full):
        return _convert(tmp, tiny_hf_dir(tmp / "src"))


CASES = [
    Case("safetensors header is a list", _header([1, 2]), r"model\.safetensors: .*header is a JSON list"),
    Case("safetensors entry is not an object", _header({"a": [0, 8]}), r"tensor 'a' has header entry \[0, 8\]"),
    Case("safetensors data_offsets are strings", _header({"a": {**F32x2, "data_offsets": ["0", "8"]}}),
         r"tensor 'a' has data_offsets \['0', '8'\]"),
    Case("safetensors data_offsets is a number", _header({"a": {**F32x2, "data_offsets": 8}}),
         r"tensor 'a' has data_offsets 8"),
    Case("safetensors shape holds a float", _header({"a": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}}),
         r"tensor 'a' has shape \[2\.5\]"),
    Case("safetensors offset is negative", _header({"a": {**F32x2, "data_offsets": [-8, 0]}}),
         r"model\.safetensors: tensor 'a' has data_offsets \[-8, 0\]"),
    Case("safetensors offset past the data", _header({"a": {**F32x2, "data_offsets": [64, 72]}}),
         r"model\.safetensors: file is truncated: tensor 'a'"),
    Case("safetensors tensors overlap", _header({"a": {**F32x2, "data_offsets": [0, 8]},
                                                 "b": {**F32x2, "data_offsets": [4, 12]}}, 12),
         r"model\.safetensors: tensor 'b' .* overlaps tensor 'a'"),
    Case("safetensors size is not shape x dtype", _header({"a": {**F32x2, "data_offsets": [0, 12]}}, 12),
         r"tensor 'a' of shape \(2,\) F32 has 12 bytes of data, expected 8"),
    Case("weight_map is a list", _weight_map(["model.safetensors"]), r"index\.json: weight_map is \['model"),
    Case("config.json hidden_size is a float", _config(hidden_size=64.5), r"config\.json: hidden_size=64\.5: expected an integer"),
    Case("config.json vocab_size is a string", _config(vocab_size="256"), r"config\.json: vocab_size='256'"),
    Case("config.json num_hidden_layers is a list", _config(num_hidden_layers=[2]), r"num_hidden_layers=\[2\]"),
    Case("config.json num_key_value_heads is 0", _config(num_key_value_heads=0), r"num_key_value_heads=0: expected a positive"),
    Case("config.json rope_theta is a string", _config(rope_theta="1e4"), r"rope_theta='1e4': expected a number"),
    Case("config.json eos_token_id is a string", _config(eos_token_id="</s>"), r"eos_token_id='</s>'"),
    Case("config.json rope_scaling is a list", _config(rope_scaling=[8.0]), r"rope_scaling=\[8\.0\]: expected an object"),
    Case("config.json tie_word_embeddings is a string", _config(tie_word_embeddings="no"), r"tie_word_embeddings='no'"),
    Case("config.json claims 10**9 layers", _config(num_hidden_layers=10**9),
         r"num_layers=1000000000, but the checkpoint's files hold tensors for 2 layer"),
    Case("tokenizer_config.json links outside the source", _linked("tokenizer_config.json"),
         r"tokenizer_config\.json: is a link to .*secret\.txt, outside the source directory"),
    Case("tokenizer.model links outside the source", _linked("tokenizer.model"), r"tokenizer\.model: is a link to"),
    Case("a Meta directory without torch", _meta_without_torch, r"PyTorch.*not installed.*pip install torch"),
    Case("disk full while converting", _disk_full, r"dst: no space left on device"),
]
