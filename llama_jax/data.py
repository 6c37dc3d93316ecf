"""`python -m llama_jax.data prepare ...`: the data preparer's command line (the code is in llama_jax.training.data)."""

import sys

from llama_jax.training.data import main

if __name__ == "__main__":
    sys.exit(main())
