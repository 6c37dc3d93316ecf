"""`python -m llama_jax.aot train|sample|plan ...`: ahead-of-time compilation for TPU slices, and the planner."""

import sys

from llama_jax.aot.cli import main

sys.exit(main())
