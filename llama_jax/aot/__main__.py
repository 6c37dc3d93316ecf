"""`python -m llama_jax.aot train|sample ...`: ahead-of-time compilation for TPU slices."""

import sys

from llama_jax.aot.cli import main

sys.exit(main())
