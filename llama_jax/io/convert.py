"""Convert Hugging Face / Meta / GGUF Llama checkpoints into llama_jax checkpoints, and back out to Hugging Face
or GGUF.

    python -m llama_jax.convert SRC DST [--dtype bfloat16|float16|float32] [--force]
    python -m llama_jax.convert --to-hf SRC DST [--dtype ...] [--max-shard-size 5GB] [--force]
                                [--push-to-hub ORG/NAME [--private] [--dry-run]]
    python -m llama_jax.convert --to-gguf SRC OUT.gguf [--type f16|bf16|q8_0|q4_0|q4_k_m] [--force]

SRC may be an hf://ORG/NAME[@REVISION] model on the Hugging Face Hub (fetched through its cache, io/hub.py).

Both directions stream: one tensor (one layer of a stacked leaf, or one row block of the embedding) is in
memory at a time, so host memory does not grow with the model (bench/convert_memory.py measures it). All
checks on names and shapes run before anything is written; the output is built in a temporary directory
beside DST and renamed into place at the end, so a failure leaves nothing half-written at DST.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import glob
import json
import os
import re
import shutil
import sys
import tempfile
from typing import List, Optional, Tuple

import numpy as np

from llama_jax.config import dtype_of
from llama_jax.errors import ConversionError, LlamaJaxError
from llama_jax.io.blocks import hf_blocks, leaves, read_block
from llama_jax.io.checkpoint import ParamsReader, ParamsWriter, write_metadata
from llama_jax.io import hub, paths
from llama_jax.io.formats import open_source
from llama_jax.io.safetensors_io import SafetensorsWriter
from llama_jax.io.source import copy_files, tokenizer_files_in

DTYPE_CHOICES = ("bfloat16", "float16", "float32")
INPUT_ERRORS = (LlamaJaxError, OSError)  # OSError: a disk or permission problem, named by the OS


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, dynamic_ncols=True)


@contextlib.contextmanager
def staged_output(dst: str, force: bool = False, src: Optional[str] = None):
    """Yields a temporary directory beside `dst`; on success it becomes `dst` (replacing it with `force`),
    on any failure it is removed and `dst` is untouched. A gs:// `dst`: see `_staged_remote`."""
    if paths.is_remote(dst):
        with _staged_remote(dst, force, src) as tmp:
            yield tmp
        return
    dst = os.path.abspath(dst)
    _clean_stale(dst)  # first: it may put back the previous output that a killed run had moved aside
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise ConversionError(f"{dst}: exists and is not a directory")
    if os.path.isdir(dst) and os.listdir(dst) and not force:
        raise ConversionError(f"{dst}: already exists and is not empty; pass --force to replace it")
    if src is not None:
        real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
        if real_src == real_dst or real_src.startswith(real_dst + os.sep):
            raise ConversionError(f"{dst}: the destination would replace the source {src}; choose another DST")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    try:
        try:
            yield tmp
        except (OSError, ValueError) as e:  # tensorstore reports a full disk as a ValueError
            if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
                raise ConversionError(f"{dst}: no space left on device while writing it ({e}); nothing was "
                                      "written to the destination: free some space and run again") from None
            raise
        os.chmod(tmp, 0o755)
        old = None
        if os.path.isdir(dst):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=parent)
            os.rename(dst, os.path.join(old, "x"))
        os.rename(tmp, dst)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _staged_remote(dst: str, force: bool, src: Optional[str]):
    """`staged_output` on Cloud Storage, which has no rename: a staging prefix beside `dst`, published (copied
    server-side, the marker files last) once complete. A failure before publishing removes it and leaves `dst`
    untouched; a failure while publishing keeps it and names it (paths.PublishError)."""
    dst = paths.absolute(dst)
    paths.require_folder(dst)
    paths.require_bucket(dst)
    if paths.isfile(dst):
        raise ConversionError(f"{dst}: exists and is not a directory")
    if paths.listdir(dst) and not force:
        raise ConversionError(f"{dst}: already exists and is not empty; pass --force to replace it")
    if src is not None and paths.is_remote(src):
        real_src = paths.absolute(src)
        if real_src == dst or real_src.startswith(dst + "/"):
            raise ConversionError(f"{dst}: the destination would replace the source {src}; choose another DST")
    tmp = paths.staging(dst)  # also removes what an interrupted run left beside dst
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(LlamaJaxError):
            paths.rmtree(tmp)
        raise
    paths.publish(tmp, dst)


def _clean_stale(dst: str) -> None:
    """Remove what an interrupted run for the same `dst` left beside it: .DST.tmp-* (a half-written output) and
    .DST.old-* (the previous output, moved aside just before the rename; put back first if DST is missing)."""
    parent, base = os.path.dirname(dst), glob.escape(os.path.basename(dst))
    for old in glob.glob(os.path.join(parent, f".{base}.old-*")):
        if not os.path.lexists(dst) and os.path.isdir(os.path.join(old, "x")):
            os.rename(os.path.join(old, "x"), dst)  # killed between the two renames: the old output is whole
        shutil.rmtree(old, ignore_errors=True)
    for tmp in glob.glob(os.path.join(parent, f".{base}.tmp-*")):
        shutil.rmtree(tmp, ignore_errors=True)


def _return_large_blocks_to_the_os() -> None:
    """Make glibc serve every allocation over 1 MiB with mmap, so a freed tensor goes back to the OS at once.
    By default glibc raises that threshold after the first large free (up to 32 MiB), after which tensors come
    from the heap arenas of tensorstore's writer threads and resident memory creeps up as they fragment
    (measured: +120 MiB over a 1 GB conversion; flat with this). Process-wide and harmless; glibc only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _copy_tokenizer(src_dir: str, dst_dir: str) -> List[str]:
    # copy_files refuses a symlink that leads out of src_dir
    return copy_files(src_dir, dst_dir, tokenizer_files_in(src_dir))


# ---------------------------------------------------------------------------------------------- in
def convert_to_llama_jax(src: str, dst: str, dtype: Optional[str] = None, force: bool = False,
                         progress: bool = True) -> str:
    """Convert a HF or Meta checkpoint directory `src` into a llama_jax checkpoint at `dst`. Returns dst."""
    if dtype is not None and dtype not in DTYPE_CHOICES:
        raise ConversionError(f"dtype={dtype!r}: expected one of {DTYPE_CHOICES}")
    source = open_source(src)  # checks every name and shape before anything is written
    _return_large_blocks_to_the_os()
    dtype = dtype or source.dtype_name()
    np_dtype = dtype_of(dtype)
    config = source.config.replace(param_dtype=dtype)
    plan = leaves(config, np_dtype.itemsize)
    with staged_output(dst, force, source.directory) as tmp:
        writer = ParamsWriter(tmp, [(leaf.path, leaf.shape, leaf.block_axis, leaf.block) for leaf in plan], np_dtype)
        with _progress(sum(len(leaf.blocks()) for leaf in plan), "converting", progress) as bar:
            for leaf in plan:
                for index in leaf.blocks():
                    writer.write(leaf.path, index, read_block(source, leaf, index, np_dtype))
                    bar.update(1)
        tokenizer = source.copy_tokenizer(tmp)
        # an hf:// name is kept as the user gave it
        origin = src if hub.is_hub(src) else paths.absolute(src)
        write_metadata(tmp, config, dtype, {"kind": source.kind, "path": origin,
                                            "tokenizer_files": tokenizer}, checksums=writer.checksums())
    return dst


# ---------------------------------------------------------------------------------------------- out
def parse_size(text) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20, 1000 -> 1000 (transformers' spelling)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConversionError(f"max shard size {text!r}: expected a number of bytes like 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return max(1, int(float(m.group(1)) * scale))


def plan_shards(specs: List[Tuple[str, np.dtype, Tuple[int, ...]]], max_bytes: int):
    shards: List[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = spec[1].itemsize * int(np.prod(spec[2]))
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def export_to_hf(src: str, dst: str, dtype: Optional[str] = None, max_shard_size="5GB", force: bool = False,
                 progress: bool = True) -> str:
    """Write the llama_jax checkpoint `src` as a Hugging Face directory at `dst`: sharded safetensors
    (model-0000X-of-0000Y.safetensors + model.safetensors.index.json), config.json and tokenizer files."""
    if dtype is not None and dtype not in DTYPE_CHOICES:
        raise ConversionError(f"dtype={dtype!r}: expected one of {DTYPE_CHOICES}")
    reader = ParamsReader(src)
    _return_large_blocks_to_the_os()
    dtype = dtype or reader.meta.get("dtype") or reader.config.param_dtype
    np_dtype = dtype_of(dtype)
    config = reader.config.replace(param_dtype=dtype)
    # (HF name, leaf, our layer) in file order: the spec's order, each stacked leaf layer by layer (a stack's
    # layer i is named by its checkpoint index: Mllama numbers self and cross layers together)
    tensors = [(leaf.param.hf_name(hf_layer), leaf, layer) for leaf in leaves(config, np_dtype.itemsize)
               for layer, hf_layer in (enumerate(leaf.param.hf_layers(config)) if leaf.stacked else ((None, None),))]
    leaf_of = {name: (leaf, layer) for name, leaf, layer in tensors}
    specs = [(name, np_dtype, leaf.param.hf_shape(config)) for name, leaf, _ in tensors]
    shards = plan_shards(specs, parse_size(max_shard_size))
    with staged_output(dst, force, src) as tmp, _progress(len(tensors), "exporting", progress) as bar:
        weight_map, total = {}, 0
        for k, shard in enumerate(shards):
            filename = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            with SafetensorsWriter(paths.join(tmp, filename), shard, {"format": "pt"}) as w:
                for name, _, shape in shard:
                    for block in hf_blocks(reader.read, *leaf_of[name], config):
                        w.write(name, block.astype(np_dtype))
                    weight_map[name] = filename
                    total += np_dtype.itemsize * int(np.prod(shape))
                    bar.update(1)
        with paths.open(paths.join(tmp, "model.safetensors.index.json"), "w") as f:
            f.write(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        with paths.open(paths.join(tmp, "config.json"), "w") as f:
            f.write(json.dumps(config.to_hf_dict(), indent=2))
        _copy_tokenizer(src, tmp)
    return dst


def to_gguf(src: str, dst: str, type: str = "f16", force: bool = False, progress: bool = True) -> str:
    """`export_to_gguf`, also to a gs:// `dst`: the file is written in a local temporary directory and uploaded
    (one object, which appears whole once its upload completes)."""
    from llama_jax.io.gguf_export import export_to_gguf

    if not paths.is_remote(dst):
        return export_to_gguf(src, dst, type, force, progress)
    dst = paths.absolute(dst)
    paths.require_bucket(dst)
    if paths.isdir(dst):
        raise ConversionError(f"{dst}: is a directory; --to-gguf writes one file (e.g. {dst}/model.gguf)")
    if paths.exists(dst) and not force:
        raise ConversionError(f"{dst}: already exists; pass --force to replace it")
    with tempfile.TemporaryDirectory(prefix="llama_jax-gguf-") as tmp:
        paths.copy_file(export_to_gguf(src, os.path.join(tmp, paths.basename(dst)), type, True, progress), dst)
    return dst


# ---------------------------------------------------------------------------------------------- CLI
def _size_of(directory: str) -> str:
    """'12 files, 2.47 GB': what the converter wrote, for its one line on success."""
    count, total = paths.du(directory)
    return f"{count} files, {hub.format_bytes(total)}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_jax.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="HF directory, Meta directory, GGUF file, or (with --to-hf / --to-gguf) a "
                        "llama_jax checkpoint")
    parser.add_argument("dst", help="output directory (must not exist or be empty, unless --force)")
    parser.add_argument("--to-hf", action="store_true", help="export a llama_jax checkpoint to Hugging Face")
    parser.add_argument("--to-gguf", action="store_true",
                        help="export a llama_jax checkpoint to one GGUF file DST (llama.cpp, Ollama)")
    parser.add_argument("--type", default="f16", help="with --to-gguf: f16 (default), bf16, f32, q8_0, q4_0, "
                        "q4_1, q5_0, q5_1 or q4_k_m (q4_k_m needs llama-cpp-python)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, help="parameter dtype (default: the source's)")
    parser.add_argument("--max-shard-size", default="5GB", help="with --to-hf: largest safetensors file")
    parser.add_argument("--force", action="store_true", help="replace a non-empty DST")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None,
                        help="with --to-hf: upload DST to the Hugging Face Hub model repository REPO (ORG/NAME)")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create REPO private")
    parser.add_argument("--dry-run", action="store_true", help="with --push-to-hub: list what would be pushed")
    args = parser.parse_args(argv)
    if args.to_hf and args.to_gguf:
        print("error: --to-hf and --to-gguf are two exports; give one", file=sys.stderr)
        return 2
    if args.push_to_hub and not args.to_hf:
        print("error: --push-to-hub needs --to-hf (it uploads the Hugging Face directory written to DST)",
              file=sys.stderr)
        return 2
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)  # Orbax logs each save step at WARNING/INFO
    try:
        if args.push_to_hub:
            hub.check_repo_id(args.push_to_hub)  # before the export, not after it
        if args.to_gguf:
            to_gguf(args.src, args.dst, args.type, args.force, not args.no_progress)
            print(f"wrote a GGUF file ({args.type}) to {args.dst}: {hub.format_bytes(paths.getsize(args.dst))}")
        elif args.to_hf:
            export_to_hf(args.src, args.dst, args.dtype, args.max_shard_size, args.force, not args.no_progress)
            print(f"wrote a Hugging Face directory (safetensors) to {args.dst}: {_size_of(args.dst)}")
            if args.push_to_hub:
                hub.push_folder(args.dst, args.push_to_hub, dry_run=args.dry_run, private=args.private)
        else:
            convert_to_llama_jax(args.src, args.dst, args.dtype, args.force, not args.no_progress)
            print(f"wrote a llama_jax checkpoint to {args.dst}: {_size_of(args.dst)}")
    except INPUT_ERRORS as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written to the destination", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
