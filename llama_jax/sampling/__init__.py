"""sampling: strategies (objects passed through), one compiled prefill/decode program, streaming, the Sampler.

    strategies.py   Greedy, Sample, Temperature, TopK, TopP; make_strategy (knobs -> a strategy)
    program.py      prefill, decode_step, the while_loop program, generate_ids, buckets, KV cache shardings
    stream.py       the streaming sink the compiled loop calls, TextStream, decode_continuation
    sampler.py      Sampler: load once, generate / chat from text
    vision.py       Llama 3.2 Vision: <|image|> prompts, chat image parts, the image arrays for the program
"""

from llama_jax.sampling.program import bucket, decode_step, generate_ids, kv_cache_sharding, kv_mask, prefill
from llama_jax.sampling.sampler import Sampler
from llama_jax.sampling.strategies import (Greedy, Sample, Strategy, Temperature, TopK, TopP, make_strategy,
                                           resolve_strategy)
from llama_jax.sampling.stream import TextStream, decode_continuation

__all__ = ["Greedy", "Sample", "Sampler", "Strategy", "Temperature", "TextStream", "TopK", "TopP", "bucket",
           "decode_continuation", "decode_step", "generate_ids", "kv_cache_sharding", "kv_mask", "make_strategy",
           "prefill", "resolve_strategy"]
