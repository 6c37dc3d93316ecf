"""The end of a run: the final weights as a llama_jax checkpoint in WORKDIR/export (LoRA merged into its
base), and a short greedy sample from them."""

from __future__ import annotations

import errno
import os
import shutil
from typing import Optional

import jax

from llama_jax.config import LlamaConfig
from llama_jax.errors import CheckpointError, PublishError
from llama_jax.parallel import distributed
from llama_jax.training import data as data_lib
from llama_jax.training import lora as lora_lib


def export_run(setup, state, lora: bool, sample: bool = True, say=print) -> str:
    """Export the final `state` of the run `setup` (a training.setup.Setup) and, when the run asks for one and
    has a tokenizer, print a greedy sample; returns the export directory. Collective: every process calls it."""
    cfg, config = setup.cfg, setup.model
    # a quantized (QLoRA) base is dequantized into the run's param dtype, then merged
    params = state.params if not lora else lora_lib.merge(state.frozen, state.params, cfg.lora.alpha,
                                                          config.param_dtype)
    export_dir = export_params(cfg.workdir, config, params, setup.tokenizer_path)
    if sample and cfg.sample_tokens and jax.process_count() == 1 and setup.tokenizer_path:
        say("sample (greedy): " + greedy_sample(config, params, setup.tokenizer_path, cfg.sample_prompt,
                                                 cfg.sample_tokens, setup.mesh))
    return export_dir


def export_params(workdir: str, config: LlamaConfig, params, tokenizer_dir: Optional[str]) -> str:
    """Write `params` as a llama_jax checkpoint in WORKDIR/export (+ the tokenizer files of `tokenizer_dir`, also
    copied to WORKDIR itself), so `llama_jax.load(WORKDIR)`, `llama_jax.load_tokenizer(WORKDIR)`, sample.py
    and the converter (`python -m llama_jax.convert --to-hf WORKDIR/export OUT`) read it. Collective: every
    process calls it.

    It is written beside, in WORKDIR/.export.tmp, and renamed into place once complete (the previous export is
    moved aside for the moment between the two renames), so a kill or a full disk at any point leaves the
    previous export loadable; the next export clears what such a failure left. In a gs:// workdir, which has no
    rename, WORKDIR/.export.tmp is published instead (io/paths.py: copied server-side, llama_jax.json last)."""
    import orbax.checkpoint as ocp

    from llama_jax.io import checkpoint, integrity, paths

    workdir, remote = paths.absolute(workdir), paths.is_remote(workdir)
    out, tmp, old = (paths.join(workdir, n) for n in ("export", ".export.tmp", ".export.old"))
    main = jax.process_index() == 0
    if main:
        paths.rmtree(tmp) if remote else _clear_stale(out, tmp, old)
    distributed.barrier("export: start")
    checksums = integrity.tree_checksums(params)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(paths.join(tmp, checkpoint.PARAMS_DIR), params, force=True)
        if main:
            checkpoint.write_metadata(tmp, config, config.param_dtype, source={"trained_by": "train.py",
                                                                              "workdir": workdir},
                                      checksums=checksums)
            if tokenizer_dir:
                data_lib.copy_tokenizer_files(tokenizer_dir, tmp)
            if remote:
                paths.publish(tmp, out)
            else:
                if os.path.isdir(out):
                    os.rename(out, old)
                os.rename(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            if tokenizer_dir:
                data_lib.copy_tokenizer_files(tokenizer_dir, workdir)
    except Exception as e:  # noqa: BLE001 - tensorstore reports a full disk as a ValueError, Orbax as anything
        if main and not isinstance(e, PublishError):  # a failed publish keeps the whole export, named
            paths.rmtree(tmp)
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
            raise CheckpointError(f"{out}: no space left on device while writing the export; the previous export "
                                  "(if any) is untouched: free some space and export again") from None
        raise
    distributed.barrier("export: done")
    return out


def _clear_stale(out: str, tmp: str, old: str) -> None:
    """Remove a half-written export left by a killed run; put back the previous one if the kill came between
    the two renames (export moved aside, the new one not yet in place)."""
    if os.path.isdir(old) and not os.path.exists(out):
        os.rename(old, out)
    for d in (tmp, old):
        shutil.rmtree(d, ignore_errors=True)


def greedy_sample(config: LlamaConfig, params, tokenizer_path: str, prompt: str, n: int, mesh=None) -> str:
    """A short greedy continuation of `prompt` with the compiled sampler (llama_jax.sampling.program)."""
    from llama_jax.sampling import generate_ids

    tok = data_lib.load_text_tokenizer(tokenizer_path)
    ids = tok.encode(prompt, bos=True)
    n = max(0, min(n, config.max_position_embeddings - len(ids)))
    out = generate_ids(params, config, [ids], max_new_tokens=n, stop_ids=tuple(config.eos_token_id), mesh=mesh)
    # decode prompt and continuation together: SentencePiece drops a word-initial space at the start of a decode
    return tok.decode([i for i in ids if i != tok.bos_id] + list(out[0]))
