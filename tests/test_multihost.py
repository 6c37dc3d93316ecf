"""Two processes of 4 fake CPU devices each, joined by jax.distributed on 127.0.0.1 (gloo collectives), each
feeding only its rows of the global batch, train with the same losses as one process of 8 devices, and write
one checkpoint together that restores here onto another mesh."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from multihost_common import MESH, make_batches, run_steps
from llama_jax.parallel.sharding import make_mesh

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 180  # generous for a loaded 2-core CI machine; both processes are killed past it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(tmp_path):
    port, out = _free_port(), str(tmp_path / "losses.json")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs, logs = [], []
    for pid in range(2):
        log = open(tmp_path / f"worker{pid}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"), str(pid), "2",
                                       str(port), out], cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:  # never leave a worker behind (a dead peer can block the other in a collective)
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read()[-3000:])
        log.close()
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], f"worker exit codes {codes} (killed after {TIMEOUT_S}s if negative)\n" + \
        "\n".join(f"--- worker {i} ---\n{t}" for i, t in enumerate(texts))
    with open(out) as f:
        main = json.load(f)
    with open(out + ".1") as f:
        other = json.load(f)
    return main, other


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    import jax

    from llama_jax import load
    from llama_jax.parallel.sharding import param_shardings

    main, other = _run_two_processes(tmp_path)
    # Each process loaded only its half of every global batch.
    assert main["rows"] == [0, 1, 2, 3] and other["rows"] == [4, 5, 6, 7]
    reference, ref_params = run_steps(make_mesh(*MESH), make_batches())  # this process: 8 devices
    np.testing.assert_allclose(main["losses"], reference, rtol=1e-5)
    np.testing.assert_allclose(other["losses"], reference, rtol=1e-5)
    assert len(set(np.round(reference, 4))) > 1  # the steps really changed the model

    # The checkpoint both processes wrote restores onto a mesh of another shape, equal to what they held.
    held = dict(np.load(tmp_path / "losses.json.params.npz"))
    target = make_mesh(1, 8, 1)
    cfg, restored = load(tmp_path / "losses.json.ckpt", mesh=target)
    flat = {"/".join(str(k.key) for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(restored)[0]}
    assert sorted(flat) == sorted(held)
    for name, value in flat.items():
        np.testing.assert_array_equal(np.asarray(value), held[name], err_msg=name)
    want = param_shardings(cfg, target)
    jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(f"{x.sharding} != {s}"),
                 restored, want)
    # ... and equal to the single-process run's parameters.
    ref = {"/".join(str(k.key) for k in p): np.asarray(v)
           for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(ref_params))[0]}
    for name, value in ref.items():
        err = np.max(np.abs(held[name] - value)) / np.max(np.abs(value))
        assert err <= 1e-5, f"{name}: two processes vs one differ by {err:.1e} (relative)"


def test_initialize_flags_and_single_process_batches():
    """Cheap checks that need no second process: flags, the single-process no-op, this process's rows."""
    import argparse

    import pytest

    from llama_jax.parallel import distributed

    args = distributed.add_flags(argparse.ArgumentParser()).parse_args(
        ["--coordinator_address", "127.0.0.1:1234", "--num_processes", "2", "--process_id", "1"])
    assert (args.coordinator_address, args.num_processes, args.process_id) == ("127.0.0.1:1234", 2, 1)
    with pytest.raises(ValueError, match="give all of --coordinator-address"):
        distributed.initialize("127.0.0.1:1234", None, 0)
    with pytest.raises(ValueError, match="process_id=2 must be in"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    assert distributed.initialize() is False  # no flags, not a TPU pod: single process, nothing to do
    assert distributed.is_main_process()

    mesh = make_mesh(2, 2, 2)
    assert distributed.process_batch_rows(mesh, 8).tolist() == list(range(8))
    local = {"tokens": np.arange(8 * 3).reshape(8, 3)}
    batch = distributed.global_batch(local, mesh, 8)
    assert batch["tokens"].shape == (8, 3) and batch["tokens"].addressable_shards[0].data.shape == (2, 3)
    np.testing.assert_array_equal(distributed.to_host(batch["tokens"]), local["tokens"])
    with pytest.raises(ValueError, match="has 4 rows"):
        distributed.global_batch({"tokens": local["tokens"][:4]}, mesh, 8)
