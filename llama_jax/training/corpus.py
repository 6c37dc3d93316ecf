"""The built-in corpus of the default run: English prose every Python install already has, no download.

`python train.py` with no data path trains on the docstrings of Python's standard library (modules, classes
and functions, read with `ast` from the `.py` files in a fixed order, so the corpus is the same on every run
of one Python version). A SentencePiece tokenizer is trained on that text, then the text is tokenized into
the token files of `llama_jax.training.data`. Everything is cached under one directory keyed by the Python version
and the vocabulary size; a second run finds it and starts training at once.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import shutil
import socket
import sys
import sysconfig
from typing import Iterator, List

CORPUS_VERSION = "stdlib-docstrings-v1"
# Directories of the standard library that hold tests, vendored copies or generated files, not prose.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "ensurepip", "turtledemo",
              "__pycache__", "encodings", "pydoc_data", "config-3", "tkinter"}


def default_cache_dir(root: str | None = None) -> str:
    """Where the built-in corpus lives: under `root`, else $LLAMA_JAX_CACHE, else ~/.cache/llama_jax."""
    root = root or os.environ.get("LLAMA_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llama_jax")
    return os.path.join(root, f"{CORPUS_VERSION}-py{sys.version_info[0]}{sys.version_info[1]}")


def _stdlib_files() -> List[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return files


def _clean(doc: str) -> str:
    """Docstring -> paragraphs of plain prose (doctest lines and very short fragments dropped)."""
    lines = [ln.strip() for ln in doc.strip().splitlines()]
    lines = [ln for ln in lines if not ln.startswith((">>>", "..."))]
    text = "\n".join(lines).strip()
    return text if len(text) >= 40 else ""


def iter_documents() -> Iterator[str]:
    """The corpus as documents, in a fixed order: one document per docstring of the standard library."""
    for path in _stdlib_files():
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        for node in nodes:
            doc = ast.get_docstring(node)
            text = _clean(doc) if doc else ""
            if text:
                yield text


def train_sentencepiece(text_path: str, model_prefix: str, vocab_size: int) -> str:
    """Train a BPE SentencePiece model on a text file (one sentence per line); returns the .model path.

    Ids: 0 <unk>, 1 <s> (BOS), 2 </s> (EOS) — the Llama 1/2 convention, so the presets' bos/eos ids hold.
    Bytes fall back to <0xNN> pieces, so every string round-trips. One thread keeps the result deterministic.
    """
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=text_path, model_prefix=model_prefix, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, max_sentence_length=4096, shuffle_input_sentence=False, minloglevel=2,
        split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False)
    return model_prefix + ".model"


def ensure_default_corpus(vocab_size: int, cache_dir: str | None = None, verbose: bool = True) -> str:
    """Build (once) the built-in corpus, its tokenizer and its token files; returns the token directory.

    The directory holds `tokenizer.model`, `meta.json`, `train.bin`/`val.bin` and their document indexes
    (see `llama_jax.training.data`). It is built in a directory of its own beside (named by host and process)
    and renamed into place when complete, so an interrupted build is never half-used and several processes
    may build at once: on hosts that share the cache directory the first to finish wins, and the build is
    deterministic, so every host of a multi-host run trains on the same tokens (the trainer checks that).
    """
    out = os.path.join(cache_dir or default_cache_dir(), f"vocab{vocab_size}")
    if os.path.isfile(os.path.join(out, "meta.json")):
        return out
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    _clear_stale(out)
    tmp = f"{out}.tmp-{socket.gethostname()}-{os.getpid()}"
    try:
        _build(tmp, vocab_size, verbose, final=out)
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first (a non-empty `out` cannot be replaced): use its build
            if not os.path.isfile(os.path.join(out, "meta.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _clear_stale(out: str) -> None:
    """Remove what an interrupted build left: a directory without meta.json (from before builds were staged) and
    this host's staging directories whose process is gone."""
    if os.path.isdir(out) and not os.path.isfile(os.path.join(out, "meta.json")):
        shutil.rmtree(out, ignore_errors=True)
    prefix = f"{os.path.basename(out)}.tmp-{socket.gethostname()}-"
    for name in os.listdir(os.path.dirname(out)):
        pid = name[len(prefix):]
        if name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(os.path.dirname(out), name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _build(out: str, vocab_size: int, verbose: bool, final: str) -> None:
    from llama_jax.training import data

    os.makedirs(out, exist_ok=True)
    log = print if verbose else (lambda *a, **k: None)
    log(f"building the built-in corpus (Python standard library docstrings) in {final} ...")
    docs = list(iter_documents())
    text_path = os.path.join(out, "corpus.txt")
    with io.open(text_path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(doc.replace("\n", " ") + "\n")
    digest = hashlib.sha256(open(text_path, "rb").read()).hexdigest()[:16]
    log(f"  {len(docs)} documents, {os.path.getsize(text_path) / 1e6:.1f} MB; training a SentencePiece "
        f"tokenizer (vocab {vocab_size}) ...")
    train_sentencepiece(text_path, os.path.join(out, "tokenizer"), vocab_size)
    tokenizer = data.load_text_tokenizer(os.path.join(out, "tokenizer.model"))
    data.write_token_files(out, ({"text": d} for d in docs), tokenizer, val_every=50,
                           source=f"{CORPUS_VERSION} sha256:{digest}", total=len(docs), progress=verbose)
    with open(os.path.join(out, "corpus.json"), "w") as f:
        json.dump({"version": CORPUS_VERSION, "documents": len(docs), "sha256": digest}, f)


def fingerprint(path: str) -> str:
    """What must be equal on every host of a run on the built-in corpus: its meta.json and its tokenizer."""
    h = hashlib.sha256()
    for name in ("meta.json", "tokenizer.model"):
        with open(os.path.join(path, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()
