"""Transparent huge pages for XLA:CPU's buffers: the command lines re-execute themselves with glibc's malloc
told to ask for them.

XLA:CPU allocates a program's temporaries afresh at every call, and glibc serves allocations over 32 MB with
new memory mappings, so every train step touches hundreds of MB of never-used pages: the bench-20m step faulted
190,000 pages (780 MB) per step, each fault a trip into the kernel (and, in a virtual machine, often the
hypervisor). `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc 2.35+) makes malloc mark those mappings for
transparent huge pages, which the kernel then maps 2 MB at a time: 1,250 faults per step, and the bench-20m
step went from 1.48 to 1.36 s (a 2048-token prefill from 3.2 to 2.95 s) on this project's 2-core machine.

glibc reads the variable once, when a process starts, so it cannot be set from inside Python: `train.py`,
`sample.py` and the bench/ scripts call `reexec_with_huge_pages()` first thing, which starts the same command
again with it set (same process id, nothing has run yet). It does nothing where it cannot help: not Linux,
glibc older than 2.35, the kernel's THP mode not `madvise` (`always` already gives huge pages; `never` gives
none), or the variable already set. `LLAMA_JAX_NO_REEXEC=1` turns it off. In a notebook, set the variable
before starting the kernel.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_at_least(major: int, minor: int) -> bool:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        have = tuple(int(x) for x in version.split(".")[:2])
    except (ValueError, OSError, AttributeError):
        return False
    return name == "glibc" and have >= (major, minor)


def _thp_mode() -> str:
    try:
        with open(THP_MODE) as f:
            text = f.read()  # "always [madvise] never": the bracketed one is in force
    except OSError:
        return ""
    return text[text.find("[") + 1:text.find("]")] if "[" in text else ""


def wanted() -> bool:
    """Whether re-executing with the tunable would change anything here."""
    if os.environ.get("LLAMA_JAX_NO_REEXEC") or not sys.platform.startswith("linux"):
        return False
    if "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    return _glibc_at_least(2, 35) and _thp_mode() == "madvise"


def reexec_with_huge_pages() -> None:
    """Start this command again with GLIBC_TUNABLES asking for huge pages, when that helps (see the module
    docstring). Call it before anything else runs: the process image is replaced."""
    if not wanted():
        return
    current = os.environ.get("GLIBC_TUNABLES", "")
    env = dict(os.environ, GLIBC_TUNABLES=f"{current}:{TUNABLE}" if current else TUNABLE)
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv)  # orig_argv keeps `-m module`
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
