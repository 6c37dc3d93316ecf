"""Write a llama_jax checkpoint as one GGUF file that llama.cpp / Ollama load:

    python -m llama_jax.convert --to-gguf CKPT out.gguf [--type f16|bf16|f32|q8_0|q4_0|q4_1|q5_0|q5_1|q4_k_m]

The `llama` metadata llama.cpp reads (gguf_config.metadata_of), the tokenizer (gguf_vocab.tokenizer_metadata:
SentencePiece, or byte-level BPE from tokenizer.json or Meta's tiktoken file with pre = llama-bpe), the chat
template, q/k rows permuted into llama.cpp's rotary order (its converter's `LlamaModel.permute`, which is
spec.hf_to_meta_rotary), Llama 3 rope scaling as rope_freqs.weight. Streaming: the header is written from the
shapes, then one tensor (one row block of the embedding) at a time is read, encoded and appended.

Quantization is the `gguf` package's (`gguf.quants.quantize`): Q8_0, Q4_0, Q4_1, Q5_0, Q5_1. It has no K-quant
encoders, so q4_k_m goes through llama.cpp's own `llama-quantize` tool (found on PATH or in $LLAMA_CPP_BIN)
over an f16 export, and is refused by name when the tool is not there.
1-D tensors (norms, rope factors) stay F32 and a matrix whose rows do not fill whole blocks is written F16, as
llama.cpp's converter does.
"""

from __future__ import annotations

import os
import tempfile
from typing import Iterator, List, Optional, Tuple

import numpy as np

from llama_jax.errors import ConversionError
from llama_jax.io.blocks import hf_blocks, leaves
from llama_jax.io.checkpoint import ParamsReader
from llama_jax.io.gguf import ROPE_FREQS, gguf_name
from llama_jax.io.gguf_config import llama3_factors, metadata_of
from llama_jax.io.gguf_vocab import tokenizer_metadata
from llama_jax.model import spec

# --type -> (ggml tensor type name, llama_ftype number for general.file_type)
TYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7), "q4_0": ("Q4_0", 2),
         "q4_1": ("Q4_1", 3), "q5_0": ("Q5_0", 8), "q5_1": ("Q5_1", 9)}
LLAMA_CPP_TYPES = {"q4_k_m": "Q4_K_M"}  # --type -> llama-quantize's type name
TYPE_CHOICES = tuple(TYPES) + tuple(LLAMA_CPP_TYPES)


def export_to_gguf(src: str, dst: str, type: str = "f16", force: bool = False, progress: bool = True) -> str:
    """Write the llama_jax checkpoint `src` as the GGUF file `dst` (see the module docstring)."""
    if type not in TYPE_CHOICES:
        raise ConversionError(f"--type {type!r}: expected one of {', '.join(TYPE_CHOICES)}")
    dst = os.path.abspath(dst)
    if os.path.isdir(dst):
        raise ConversionError(f"{dst}: is a directory; --to-gguf writes one file (e.g. {dst}/model.gguf)")
    if os.path.exists(dst) and not force:
        raise ConversionError(f"{dst}: already exists; pass --force to replace it")
    _refuse_vision(src)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=os.path.dirname(dst))
    os.close(fd)
    try:
        if type in LLAMA_CPP_TYPES:
            _llama_cpp_quantize(src, tmp, type, progress)
        else:
            _write(src, tmp, type, progress)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dst


def _refuse_vision(src: str) -> None:
    """GGUF's `llama` architecture has no image encoder or cross-attention layers (llama.cpp keeps a vision
    model's encoder in a separate mmproj file of its own layout): a Llama 3.2 Vision checkpoint is refused."""
    from llama_jax.io.checkpoint import is_checkpoint, read_metadata

    if is_checkpoint(src) and read_metadata(src)[1].vision is not None:
        raise ConversionError(f"{src}: is a Llama 3.2 Vision checkpoint; GGUF (general.architecture = llama) "
                              "cannot hold its image encoder and cross-attention layers: export it with --to-hf")


def _tensors(config) -> List[Tuple[str, object, Optional[int]]]:
    """(GGUF name, leaf, layer) in llama.cpp's order: embedding, each block's tensors, final norm, output."""
    plan = leaves(config, 4)
    flat = [(gguf_name(leaf.param), leaf, None) for leaf in plan if not leaf.stacked]
    blocks = [(gguf_name(leaf.param, i), leaf, i) for i in range(config.num_layers) for leaf in plan if leaf.stacked]
    return flat[:1] + blocks + flat[1:]


def _ggml_type(qtype: str, shape) -> str:
    """The type a tensor of `shape` is written in: F32 for 1-D, F16 when rows do not fill whole blocks."""
    import gguf

    if len(shape) == 1:
        return "F32"
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
    return qtype if shape[-1] % block == 0 else "F16"


def _write(src: str, path: str, type: str, progress: bool) -> None:
    import gguf

    reader = ParamsReader(src)
    config = reader.config
    qtype, ftype = TYPES[type]
    writer = gguf.GGUFWriter(path, "llama")
    from llama_jax.io import paths
    from llama_jax.io.source import TOKENIZER_FILES

    # a gs:// checkpoint's tokenizer files are read from the local cache (io/paths.py)
    tok_dir = paths.local_copy(src, TOKENIZER_FILES) if paths.is_remote(src) else src
    for key, (value, kind) in {**metadata_of(config, ftype), **tokenizer_metadata(tok_dir)}.items():
        getattr(writer, f"add_{kind}")(key, value)
    plan = []
    for name, leaf, layer in _tensors(config):
        shape = leaf.param.hf_shape(config)
        plan.append((name, leaf, layer, shape, _ggml_type(qtype, shape)))
    extra = []
    if config.rope_scaling is not None and config.rope_scaling.rope_type == "llama3":
        extra = [(ROPE_FREQS, llama3_factors(config))]
    for name, shape, kind in [(n, s, k) for n, _, _, s, k in plan] + [(n, a.shape, "F32") for n, a in extra]:
        writer.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, kind),
                               raw_dtype=gguf.GGMLQuantizationType[kind])
    from llama_jax.io.convert import _progress, _return_large_blocks_to_the_os  # here: convert imports us

    _return_large_blocks_to_the_os()

    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        with _progress(len(plan), "exporting", progress) as bar:
            for name, leaf, layer, shape, kind in plan:
                _append(writer, fout, (encode(b, kind) for b in _hf_rows(reader, leaf, layer, config)),
                        _nbytes(shape, kind))
                bar.update(1)
        for name, array in extra:
            _append(writer, fout, iter([encode(array, "F32")]), array.nbytes)
    finally:
        writer.close()


def _hf_rows(reader, leaf, layer, config) -> Iterator[np.ndarray]:
    """The leaf's Hugging Face tensor in float32 row blocks, q/k permuted for llama.cpp."""
    p = leaf.param
    for block in hf_blocks(reader.read, leaf, layer, config):
        block = np.asarray(block, np.float32)
        if p.rotary_heads:
            block = spec.hf_to_meta_rotary(block, getattr(config, p.rotary_heads))
        yield block


def _append(writer, fout, blocks, nbytes: int) -> None:
    """One tensor's data at the next aligned offset (what GGUFWriter.write_tensor_data does, a block at a time)."""
    writer.write_padding(fout, fout.tell())
    written = 0
    for data in blocks:
        fout.write(data.tobytes())
        written += data.nbytes
    assert written == nbytes, (written, nbytes)
    writer.write_padding(fout, nbytes)


def _nbytes(shape, kind: str) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    return int(np.prod(shape)) // block * size


def encode(block: np.ndarray, kind: str) -> np.ndarray:
    """float32 rows -> the bytes (or array) of ggml type `kind`."""
    import gguf

    if kind == "F32":
        return np.ascontiguousarray(block, np.float32)
    if kind == "F16":
        return np.ascontiguousarray(block, np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(block, np.float32), gguf.GGMLQuantizationType[kind])


def llama_cpp_tool(name: str) -> Optional[str]:
    """The path of one of llama.cpp's tools (llama-quantize, llama-simple): $LLAMA_CPP_BIN/NAME, else on PATH."""
    import shutil

    folder = os.environ.get("LLAMA_CPP_BIN")
    if folder and os.access(os.path.join(folder, name), os.X_OK):
        return os.path.join(folder, name)
    return shutil.which(name)


def _llama_cpp_quantize(src: str, path: str, type: str, progress: bool) -> None:
    """K-quants: an f16 GGUF quantized by llama.cpp's own `llama-quantize` (the gguf package has no K-quant
    encoder, and a hand-written one would be a second implementation to keep bit-equal to llama.cpp's)."""
    import subprocess

    tool = llama_cpp_tool("llama-quantize")
    if tool is None:
        raise ConversionError(f"--type {type}: needs llama.cpp's llama-quantize (on PATH or in $LLAMA_CPP_BIN); or "
                              f"export --type f16 and run: llama-quantize OUT.gguf OUT-{type}.gguf "
                              f"{LLAMA_CPP_TYPES[type]}")
    f16 = path + ".f16"
    try:
        _write(src, f16, "f16", progress)
        done = subprocess.run([tool, f16, path, LLAMA_CPP_TYPES[type]], capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise ConversionError(f"{path}: {tool} failed (status {done.returncode}) for --type {type}: {last}")
    finally:
        if os.path.exists(f16):
            os.remove(f16)
