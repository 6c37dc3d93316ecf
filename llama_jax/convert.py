"""`python -m llama_jax.convert`: the converter's command line (the code is in llama_jax.io.convert)."""

import sys

from llama_jax.io.convert import main

if __name__ == "__main__":
    sys.exit(main())
