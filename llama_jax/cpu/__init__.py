"""CPU speed layers, opt-in on top of the core: the per-layer decoding layout (`decode_layout`) and the huge-page
re-exec of the command lines (`host_memory`, imported before jax, so this package imports nothing itself)."""
