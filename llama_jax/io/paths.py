"""Paths that may name Cloud Storage: `gs://BUCKET/PATH` wherever llama_jax takes a path, beside local paths.

Everything here goes through libraries that already speak Cloud Storage: gcsfs (the fsspec filesystem etils
`epath`, and so Orbax, use for gs:// without tensorflow) for files and listings, and tensorstore's `gcs`
kvstore (`kvstore(path)`) for the arrays. Credentials are theirs: Application Default Credentials
(`gcloud auth application-default login`, GOOGLE_APPLICATION_CREDENTIALS, or the TPU VM's service account).
An emulator is reached with STORAGE_EMULATOR_HOST (gcsfs) and TENSORSTORE_GCS_HTTP_URL (tensorstore).

Cloud Storage has no rename, so "write beside, then rename" becomes `publish`: the output is written under a
staging prefix beside DST (`.NAME.tmp-XXXX`), then copied server-side into DST with the files that mark a
complete directory (llama_jax.json, config.json, meta.json) copied last, then the staging prefix removed. A
reader that looks for the marker never sees a half-written DST; a run killed mid-way leaves only a staging prefix
(removed by the next write to the same DST) or a DST without its marker.

Readers that need a local file (safetensors and .pth memory maps, GGUF, the memory-mapped token files) get one
from `local_copy`: the objects are copied once into LLAMA_JAX_CACHE (default ~/.cache/llama_jax)/gcs/BUCKET/PATH
and copied again only when their size or date changes. Every failure is one StorageError naming the path.
"""

from __future__ import annotations

import builtins
import contextlib
import fnmatch
import os
import posixpath
import re
import shutil
import uuid
from typing import Iterable, List, Optional, Tuple

from llama_jax.errors import PublishError, StorageError

PREFIX = "gs://"
# Bucket names: 3-63 of [a-z0-9-_.], starting and ending with a letter or digit (Cloud Storage's rule).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]")
_FS = None


def is_remote(path) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def split(path: str) -> Tuple[str, str]:
    """'gs://bucket/a/b' -> ('bucket', 'a/b'); StorageError naming the path when it is not a valid gs:// path."""
    bucket, _, key = path[len(PREFIX):].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise StorageError(f"{path}: not a Cloud Storage path; expected gs://BUCKET/PATH with a bucket name of "
                           "3-63 lowercase letters, digits, '-', '_' or '.'")
    key = posixpath.normpath(key).lstrip("/") if key.strip("/") else ""
    if key == ".." or key.startswith("../"):
        raise StorageError(f"{path}: the path climbs above its bucket ('..'); expected gs://BUCKET/PATH")
    return bucket, key


def absolute(path) -> str:
    """A gs:// path normalised (no trailing '/', no '..'), or a local path made absolute."""
    path = os.fspath(path)
    if not is_remote(path):
        return os.path.abspath(path)
    bucket, key = split(path)
    return f"{PREFIX}{bucket}/{key}" if key else f"{PREFIX}{bucket}"


def join(path: str, *parts: str) -> str:
    return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def dirname(path: str) -> str:
    return posixpath.dirname(absolute(path)) if is_remote(path) else os.path.dirname(path)


def basename(path: str) -> str:
    return posixpath.basename(absolute(path)) if is_remote(path) else os.path.basename(path)


def kvstore(path: str) -> dict:
    """tensorstore kvstore spec of a directory: the `gcs` driver for gs://, `file` otherwise."""
    if is_remote(path):
        bucket, key = split(path)
        return {"driver": "gcs", "bucket": bucket, "path": key.rstrip("/") + "/" if key else ""}
    return {"driver": "file", "path": os.path.abspath(path) + "/"}


def url(path: str) -> str:
    """tensorstore's URL of a directory (an OCDBT base): gs://... or file://..."""
    return absolute(path) if is_remote(path) else f"file://{os.path.abspath(path)}"


def _fs():
    """One gcsfs filesystem without a listings cache (tensorstore and Orbax write behind its back)."""
    global _FS
    if _FS is None:
        try:
            import gcsfs
        except ImportError:
            raise StorageError("gs:// paths need gcsfs: pip install gcsfs") from None
        _FS = gcsfs.GCSFileSystem(use_listings_cache=False)
    return _FS


@contextlib.contextmanager
def errors(path: str, what: str = "cannot access"):
    """Turn gcsfs / google-auth errors on `path` into one StorageError line."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError:
        raise StorageError(f"{path}: no such object or bucket in Cloud Storage") from None
    except Exception as e:  # noqa: BLE001 - gcsfs raises HttpError / OSError / auth errors with long bodies
        text = " ".join(str(e).split())[:300] or type(e).__name__
        if "credentials" in text.lower() or "auth" in type(e).__name__.lower():
            text += " (set up Application Default Credentials: gcloud auth application-default login)"
        raise StorageError(f"{path}: {what}: {text}") from None


def _key(path: str) -> str:
    bucket, key = split(path)
    return f"{bucket}/{key}" if key else bucket


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    with errors(path):
        return _fs().exists(_key(path))


def isfile(path: str) -> bool:
    if not is_remote(path):
        return os.path.isfile(path)
    with errors(path):
        return _fs().isfile(_key(path))


def isdir(path: str) -> bool:
    if not is_remote(path):
        return os.path.isdir(path)
    with errors(path):
        return bool(split(path)[1]) and _fs().isdir(_key(path))


def listdir(path: str) -> List[str]:
    """Names directly under `path` (files and prefixes); [] for a missing remote prefix."""
    if not is_remote(path):
        return os.listdir(path)
    with errors(path):
        try:
            entries = _fs().ls(_key(path), detail=False)
        except FileNotFoundError:
            return []
        return sorted({posixpath.basename(p.rstrip("/")) for p in entries if p.rstrip("/") != _key(path)} - {""})


def getsize(path: str) -> int:
    if not is_remote(path):
        return os.path.getsize(path)
    with errors(path):
        return int(_fs().info(_key(path))["size"])


def du(path: str) -> Tuple[int, int]:
    """(files, bytes) under a directory."""
    if not is_remote(path):
        sizes = [os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(path) for f in files]
    else:
        with errors(path):
            sizes = [int(i["size"]) for i in _fs().find(_key(path), detail=True).values()]
    return len(sizes), sum(sizes)


def open(path: str, mode: str = "r", **kw):  # noqa: A001 - the builtin's name, for paths of either kind
    """A file object; on gs:// an upload streams in blocks and the object appears whole when it is closed."""
    if not is_remote(path):
        return builtins.open(path, mode, **kw)
    with errors(path, "cannot open"):
        return _fs().open(_key(path), mode, **kw)


def makedirs(path: str) -> None:
    """Local: os.makedirs; gs:// has no directories (a prefix exists once an object is under it)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def rmtree(path: str) -> None:
    """Remove a directory (every object under a prefix); a missing one is fine."""
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    with errors(path, "cannot remove"):
        if _fs().exists(_key(path)):
            _fs().rm(_key(path), recursive=True)


def copy_file(src: str, dst: str) -> None:
    """Copy one file; either side may be gs:// (remote to remote is a server-side copy)."""
    if not is_remote(src) and not is_remote(dst):
        shutil.copyfile(src, dst)
        return
    with errors(dst if is_remote(dst) else src, "cannot copy"):
        if is_remote(src) and is_remote(dst):
            _fs().copy(_key(src), _key(dst))
        elif is_remote(dst):
            _fs().put_file(src, _key(dst))
        else:
            _fs().get_file(_key(src), dst)


def require_bucket(path: str) -> None:
    """StorageError naming the bucket of gs:// `path` when it does not exist (before anything is written)."""
    bucket, _ = split(path)
    with errors(path):
        if not _fs().exists(bucket):
            raise StorageError(f"{path}: bucket gs://{bucket} does not exist (create it first: "
                               f"gcloud storage buckets create gs://{bucket})")


def move(src: str, dst: str) -> None:
    """Rename a directory; on gs:// a server-side copy of each object, then the removal of `src`."""
    if not is_remote(src):
        os.rename(src, dst)
        return
    with errors(src, "cannot move"):
        _fs().mv(_key(src), _key(dst), recursive=True)


def require_folder(dst: str) -> None:
    """StorageError unless gs:// `dst` names a folder inside its bucket (an output beside which to stage)."""
    if not split(dst)[1]:
        raise StorageError(f"{dst}: an output needs a folder inside the bucket; expected gs://BUCKET/PATH")


def staging(dst: str) -> str:
    """A fresh staging prefix beside `dst` (gs:// only), after removing those an interrupted run left."""
    require_folder(dst)
    parent, base = dirname(dst), basename(dst)
    for name in listdir(parent):
        if name.startswith(f".{base}.tmp-"):
            rmtree(join(parent, name))
    return join(parent, f".{base}.tmp-{uuid.uuid4().hex[:12]}")


MARKERS = ("llama_jax.json", "config.json", "model.safetensors.index.json", "meta.json")


def publish(tmp: str, dst: str, markers: Iterable[str] = MARKERS) -> None:
    """Move the finished staging prefix `tmp` to `dst` on gs:// (see the module docstring): first remove dst's
    marker files (from then on dst reads as incomplete), copy every new object server-side, remove dst's objects
    the new output does not have, copy the markers last, then remove `tmp`. If a request fails part-way, `tmp`
    is kept and the PublishError names it: nothing complete is ever deleted before its replacement is whole."""
    fs, markers = _fs(), set(markers)
    is_marker = lambda name: posixpath.basename(name) in markers  # noqa: E731
    try:
        with errors(dst, "cannot write"):
            prefix, dst_prefix = _key(tmp).rstrip("/") + "/", _key(dst).rstrip("/") + "/"
            new = [o[len(prefix):] for o in sorted(fs.find(_key(tmp)))]
            old = [o[len(dst_prefix):] for o in sorted(fs.find(_key(dst)))] if fs.exists(_key(dst)) else []
            for name in filter(is_marker, old):
                fs.rm(dst_prefix + name)
            for name in (n for n in new if not is_marker(n)):
                fs.copy(prefix + name, dst_prefix + name)
            for name in sorted(set(old) - set(new)):
                if not is_marker(name):
                    fs.rm(dst_prefix + name)
            for name in filter(is_marker, new):
                fs.copy(prefix + name, dst_prefix + name)
    except StorageError as e:
        raise PublishError(f"{e}; the complete output is kept at {tmp} (copy it to {dst} or run again)") from None
    rmtree(tmp)


# ---------------------------------------------------------------------------------------------- local copies
def cache_dir(path: str) -> str:
    """Where `local_copy` keeps the objects of gs://BUCKET/PATH."""
    root = os.environ.get("LLAMA_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llama_jax")
    bucket, key = split(path)
    return os.path.join(root, "gcs", bucket, *[p for p in key.split("/") if p])


def local_copy(path: str, patterns: Optional[Iterable[str]] = None, say=print) -> str:
    """A local copy of gs:// file or directory `path` (only its top-level files matching `patterns`, if given),
    kept in `cache_dir(path)` and refreshed when an object's size or date changes; local paths pass through."""
    if not is_remote(path):
        return path
    path, fs = absolute(path), _fs()
    local = cache_dir(path)
    with errors(path, "cannot read"):
        if fs.isfile(_key(path)):
            objects, local_dir = {_key(path): fs.info(_key(path))}, os.path.dirname(local)
            names = {_key(path): os.path.basename(local)}
        elif split(path)[1] and fs.isdir(_key(path)):
            found = fs.find(_key(path), detail=True, maxdepth=None if patterns is None else 1)
            prefix = _key(path).rstrip("/") + "/"
            names = {o: o[len(prefix):] for o in found}
            names = {o: n for o, n in names.items()
                     if patterns is None or any(fnmatch.fnmatch(n, p) for p in patterns)}
            objects, local_dir = {o: found[o] for o in names}, local
        else:
            raise StorageError(f"{path}: no such object or prefix in Cloud Storage")
        stale = [o for o in objects if not _fresh(os.path.join(local_dir, names[o]), objects[o])]
        if stale:
            total = sum(int(objects[o]["size"]) for o in stale)
            say(f"{path}: copying {len(stale)} file(s), {total / 1e6:.1f} MB, to {local_dir} (read from there)")
        for o in stale:
            target = os.path.join(local_dir, names[o])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            part = f"{target}.part-{uuid.uuid4().hex[:8]}"
            fs.get_file(o, part)
            os.replace(part, target)  # atomic: two processes of one host may copy the same file at once
    return local


def _fresh(local: str, info: dict) -> bool:
    try:
        st = os.stat(local)
    except FileNotFoundError:
        return False
    updated = info.get("updated") or info.get("mtime")
    if updated is not None and not isinstance(updated, (int, float)):
        try:
            from datetime import datetime

            updated = datetime.fromisoformat(str(updated).replace("Z", "+00:00")).timestamp()
        except ValueError:
            updated = None
    return st.st_size == int(info["size"]) and (updated is None or st.st_mtime >= updated)
