"""The end of a run: the final weights as a llama_jax checkpoint in WORKDIR/export (LoRA merged into its
base), and a short greedy sample from them."""

from __future__ import annotations

import os
from typing import Optional

import jax

from llama_jax.config import LlamaConfig
from llama_jax.training import data as data_lib
from llama_jax.training import lora as lora_lib


def export_run(setup, state, lora: bool, sample: bool = True, say=print) -> str:
    """Export the final `state` of the run `setup` (a training.setup.Setup) and, when the run asks for one and
    has a tokenizer, print a greedy sample; returns the export directory. Collective: every process calls it."""
    cfg, config = setup.cfg, setup.model
    params = state.params if not lora else lora_lib.merge(state.frozen, state.params, cfg.lora.alpha)
    export_dir = export_params(cfg.workdir, config, params, setup.tokenizer_path)
    if sample and cfg.sample_tokens and jax.process_count() == 1 and setup.tokenizer_path:
        say("sample (greedy): " + greedy_sample(config, params, setup.tokenizer_path, cfg.sample_prompt,
                                                 cfg.sample_tokens, setup.mesh))
    return export_dir


def export_params(workdir: str, config: LlamaConfig, params, tokenizer_dir: Optional[str]) -> str:
    """Write `params` as a llama_jax checkpoint in WORKDIR/export (+ the tokenizer files of `tokenizer_dir`, also
    copied to WORKDIR itself), so `llama_jax.load(WORKDIR)`, `llama_jax.load_tokenizer(WORKDIR)`, sample.py
    and the converter (`python -m llama_jax.convert --to-hf WORKDIR/export OUT`) read it. Collective: every
    process calls it."""
    import orbax.checkpoint as ocp

    from llama_jax.io import checkpoint

    workdir = os.path.abspath(workdir)
    out = os.path.join(workdir, "export")
    os.makedirs(out, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(out, checkpoint.PARAMS_DIR), params, force=True)
    if jax.process_index() == 0:
        checkpoint.write_metadata(out, config, config.param_dtype, source={"trained_by": "train.py",
                                                                          "workdir": workdir})
        if tokenizer_dir:
            for d in (out, workdir):
                data_lib.copy_tokenizer_files(tokenizer_dir, d)
    return out


def greedy_sample(config: LlamaConfig, params, tokenizer_path: str, prompt: str, n: int, mesh=None) -> str:
    """A short greedy continuation of `prompt` with the compiled sampler (llama_jax.sampling.program)."""
    from llama_jax.sampling import generate_ids

    tok = data_lib.load_text_tokenizer(tokenizer_path)
    ids = tok.encode(prompt, bos=True)
    n = max(0, min(n, config.max_position_embeddings - len(ids)))
    out = generate_ids(params, config, [ids], max_new_tokens=n, stop_ids=tuple(config.eos_token_id), mesh=mesh)
    # decode prompt and continuation together: SentencePiece drops a word-initial space at the start of a decode
    return tok.decode([i for i in ids if i != tok.bos_id] + list(out[0]))
