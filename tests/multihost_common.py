"""What tests/test_multihost.py runs both in one 8-device process and in two 4-device processes."""

import jax
import numpy as np

from llama_jax import LlamaConfig
from llama_jax.parallel import distributed
from llama_jax.training import optim
from llama_jax.training import step as ts
from llama_jax.parallel.sharding import init_sharded_params

MESH = (2, 2, 2)  # (data, fsdp, tensor): data crosses the two processes, tensor stays within one
CONFIG = LlamaConfig.from_preset("tiny", num_heads=4, num_kv_heads=2, hidden_size=32, intermediate_size=64,
                                 num_layers=1, vocab_size=128)
STEPS, BATCH, LENGTH = 3, 8, 16


def make_batches():
    rng = np.random.RandomState(0)
    return [{"tokens": rng.randint(0, CONFIG.vocab_size, (BATCH, LENGTH + 1)).astype(np.int32)}
            for _ in range(STEPS)]


def run_steps(mesh, batches):
    """Train STEPS steps from a fixed init; returns (losses as floats, final params)."""
    schedule = optim.make_schedule(1e-2, 1, STEPS)
    # eps 1e-3: Adam's early steps are ~ g / |g|, which would magnify float-summation-order noise in
    # near-zero gradients when the final parameters are compared (see EPS in tests/test_sharding.py).
    optimizer = optim.make_optimizer(schedule, eps=1e-3)
    shardings = ts.state_shardings(CONFIG, optimizer, mesh)
    state = ts.init_train_state(init_sharded_params(CONFIG, mesh, jax.random.PRNGKey(0)), optimizer, shardings)
    step = ts.make_train_step(CONFIG, optimizer, mesh, shardings=shardings, schedule=schedule)
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(distributed.to_host(metrics["loss"])))
    return losses, state.params
