"""Keep jax off the TPU backend on a host that has no TPU, so the command lines start without libtpu's noise.

With `libtpu` installed (requirements-test.txt installs it: tests/test_aot.py compiles for TPU slices on a CPU
host), jax's default platform search loads libtpu on every start. On a host without TPU chips libtpu then
prints "Failed to find host bounds for accelerator type ..." and "INVALID_ARGUMENT: ... unexpected worker
hostname ..." before jax falls back to the CPU: harmless, but it reads as broken.

`cpu_unless_accelerator()` sets JAX_PLATFORMS=cpu (before jax is imported; through jax.config if it already
is) only when all of these hold: the user has not set JAX_PLATFORMS, libtpu is installed, no TPU is attached
and no GPU is visible. A TPU is "attached" when a TPU device file (/dev/accel*: v2/v3; /dev/vfio/N: v4 and
later) or a PCI device with Google's vendor id and a TPU device id is present (the check jax itself makes in
jax._src.hardware_utils; Google's vendor id alone is not enough: a GCE VM's gVNIC and NVMe disks carry it), so
a TPU VM keeps its TPU. TPU compilation without a TPU (`python -m llama_jax.aot`, `--aot`) is unaffected: it
asks libtpu for a topology explicitly. `LLAMA_JAX_NO_CPU_DEFAULT=1` turns this off.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

GOOGLE_PCI_VENDOR = "0x1ae0"
TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")  # v3 .. TPU7x, as jax
TPU_DEVICE_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*")
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")  # NVIDIA, ROCm, WSL2


def tpu_attached(pci_root: str = "/sys/bus/pci/devices", dev_globs=TPU_DEVICE_FILES) -> bool:
    """Whether this host has TPU chips: a TPU device file, or a Google PCI device with a TPU device id."""
    if any(glob.glob(pattern) for pattern in dev_globs):
        return True
    for device in glob.glob(os.path.join(pci_root, "*")):
        if _read(os.path.join(device, "vendor")) == GOOGLE_PCI_VENDOR and \
                _read(os.path.join(device, "device")) in TPU_PCI_DEVICES:
            return True
    return False


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def gpu_visible(dev_files=GPU_DEVICE_FILES) -> bool:
    return any(os.path.exists(path) for path in dev_files)


def cpu_unless_accelerator() -> bool:
    """Set the CPU platform when libtpu is installed on a host with no TPU and no GPU (see the module
    docstring); returns whether it did. Call it before jax initialises its backends."""
    if os.environ.get("JAX_PLATFORMS") or os.environ.get("LLAMA_JAX_NO_CPU_DEFAULT"):
        return False
    if importlib.util.find_spec("libtpu") is None or tpu_attached() or gpu_visible():
        return False
    os.environ["JAX_PLATFORMS"] = "cpu"  # read by jax at import; inherited by the huge-page re-exec
    if "jax" in sys.modules:  # already imported (a notebook): its flag was read from the environment already
        sys.modules["jax"].config.update("jax_platforms", "cpu")
    return True
