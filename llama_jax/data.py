"""`python -m llama_jax.data prepare ...`: the data preparer's command line (the code is in llama_jax.training.data)."""

import sys

from llama_jax.training.data import main

if __name__ == "__main__":
    from llama_jax.cpu.platform import cpu_unless_accelerator

    cpu_unless_accelerator()  # libtpu installed on a host without a TPU: no TPU probe (llama_jax/cpu/platform.py)
    sys.exit(main())
