"""The command lines re-execute themselves with glibc asking for transparent huge pages (see
llama_jax/cpu/host_memory.py), and that really cuts the page faults of fresh large buffers."""

import os
import subprocess
import sys

import pytest

from llama_jax.cpu import host_memory

# malloc and touch a fresh 64 MiB buffer (glibc serves it with a new mapping, as it serves XLA:CPU's
# buffers); print the minor page faults. Not numpy: it asks for huge pages for its own large arrays.
PROBE = """
import ctypes, os, resource
from llama_jax.cpu.host_memory import reexec_with_huge_pages
reexec_with_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(libc.malloc(64 * 2**20), 1, 64 * 2**20)
print(os.environ.get("GLIBC_TUNABLES", ""), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(**env):
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True,
                         text=True, check=True, timeout=120).stdout.split()
    return (out[0] if len(out) > 1 else ""), int(out[-1])


@pytest.mark.skipif(not host_memory.wanted(), reason="glibc < 2.35, not Linux, or THP mode is not 'madvise'")
def test_reexec_sets_the_tunable_and_cuts_page_faults():
    tunables, faults = _probe()
    assert tunables == host_memory.TUNABLE
    plain_tunables, plain_faults = _probe(LLAMA_JAX_NO_REEXEC="1")  # the opt-out: no re-exec
    assert plain_tunables == ""
    assert plain_faults >= 16384 * 0.9  # one fault per 4 KiB page
    assert faults < plain_faults / 10  # 2 MiB pages


def test_no_reexec_where_it_cannot_help(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")  # the user's own choice stands
    assert not host_memory.wanted()
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setattr(host_memory, "_thp_mode", lambda: "always")  # huge pages already
    assert not host_memory.wanted()
    monkeypatch.setattr(host_memory, "_thp_mode", lambda: "madvise")
    monkeypatch.setattr(host_memory, "_glibc_at_least", lambda *v: False)
    assert not host_memory.wanted()
    monkeypatch.setattr(host_memory, "_glibc_at_least", lambda *v: True)
    monkeypatch.setattr(sys, "platform", "linux")
    assert host_memory.wanted()
    monkeypatch.setenv("LLAMA_JAX_NO_REEXEC", "1")
    assert not host_memory.wanted()
