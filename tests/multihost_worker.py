"""One "host" of the two-process test (tests/test_multihost.py): 4 fake CPU devices, joined to the other
process through jax.distributed on 127.0.0.1; trains a few steps on its own rows of the global batch and
writes the losses (process 0) as JSON.

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_JSON
"""

import json
import os
import sys

# Before jax is imported: CPU only, 4 devices per process (overrides the test suite's 8).
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llama_jax.parallel import distributed  # noqa: E402


def main():
    process_id, num_processes, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id, timeout_s=60)

    import jax
    from multihost_common import MESH, run_steps, make_batches

    assert jax.device_count() == 4 * num_processes and jax.local_device_count() == 4, jax.devices()
    from llama_jax.parallel.sharding import make_mesh
    mesh = make_mesh(*MESH)
    # tensor is the innermost axis: each tensor-parallel group lies within one process (host).
    for group in mesh.devices.reshape(-1, mesh.shape["tensor"]):
        assert len({d.process_index for d in group}) == 1, mesh.devices
    batches = make_batches()
    global_size = batches[0]["tokens"].shape[0]
    rows = distributed.process_batch_rows(mesh, global_size)
    # Each process hands over only its own rows; the global arrays are assembled across processes.
    feeds = [distributed.global_batch({k: v[rows] for k, v in b.items()}, mesh, global_size) for b in batches]
    losses, params = run_steps(mesh, feeds)

    # A checkpoint written collectively: each process writes the shards its devices hold.
    import numpy as np
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils
    from llama_jax.io import checkpoint
    from multihost_common import CONFIG

    ckpt_dir = out + ".ckpt"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(ckpt_dir, checkpoint.PARAMS_DIR), params)
    # What the processes held, gathered, for the test to compare the restored checkpoint with.
    full = multihost_utils.process_allgather(params, tiled=True)
    if distributed.is_main_process():
        checkpoint.write_metadata(ckpt_dir, CONFIG, "float32")
        flat = {"/".join(str(k.key) for k in p): np.asarray(v)
                for p, v in jax.tree_util.tree_flatten_with_path(full)[0]}
        np.savez(out + ".params.npz", **flat)
    multihost_utils.sync_global_devices("worker done")
    with open(out + ("" if distributed.is_main_process() else f".{process_id}"), "w") as f:
        json.dump({"losses": losses, "rows": rows.tolist()}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
