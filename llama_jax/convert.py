"""`python -m llama_jax.convert`: the converter's command line (the code is in llama_jax.io.convert)."""

import sys

from llama_jax.io.convert import main

if __name__ == "__main__":
    from llama_jax.cpu.platform import cpu_unless_accelerator

    cpu_unless_accelerator()  # libtpu installed on a host without a TPU: no TPU probe (llama_jax/cpu/platform.py)
    sys.exit(main())
