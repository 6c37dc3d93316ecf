"""llama_jax checkpoints with lost or damaged data: refused on load and on --to-hf, naming the array or chunk
(tests/test_integrity.py has the training checkpoints, the fallback and the export)."""

import os
import shutil

from hostile import Case
from hostile import ckpt_fixtures as F


def _load(damage):
    def run(tmp):
        import llama_jax
        ckpt = F.checkpoint(tmp)
        damage(ckpt)
        return llama_jax.load(str(ckpt))
    return run


def _to_hf(damage):
    def run(tmp):
        from llama_jax.io.convert import main
        ckpt = F.checkpoint(tmp)
        damage(ckpt)
        raise SystemExit(main(["--to-hf", str(ckpt), str(tmp / "hf"), "--no-progress"]))
    return run


def _delete(leaf, legacy=False):
    def damage(ckpt):
        os.remove(F.chunks(ckpt, leaf)[-1])
        if legacy:
            F.drop_checksums(ckpt)
    return damage


def _flip(leaf):
    return lambda ckpt: F.flip(F.chunks(ckpt, leaf)[0])


def _unreadable(leaf):
    def damage(ckpt):  # a chunk the OS cannot read as a file
        chunk = F.chunks(ckpt, leaf)[0]
        os.remove(chunk)
        os.makedirs(chunk)
    return damage


def _truncate(leaf):
    def damage(ckpt):
        chunk = F.chunks(ckpt, leaf)[0]
        with open(chunk, "r+b") as f:
            f.truncate(os.path.getsize(chunk) // 2)
    return damage


def _no_params(ckpt):
    shutil.rmtree(ckpt / "params" / "lm_head")


CASES = [
    Case("a deleted chunk, on load", _load(_delete("layers.attn.q")), r"params.*layers\.attn\.q/1\.0\.0\.0.*(not found|missing)"),
    Case("a deleted chunk, on --to-hf", _to_hf(_delete("layers.attn.q")), r"layers\.attn\.q.*(not found|missing)"),
    Case("a deleted chunk of a checkpoint without checksums, on --to-hf", _to_hf(_delete("lm_head", legacy=True)),
         r"lm_head.*(not found|missing)"),
    Case("flipped bytes in lm_head, on load", _load(_flip("lm_head")), r"lm_head.*(checksum|corrupt|decod|zstd)"),
    Case("flipped bytes in lm_head, on --to-hf", _to_hf(_flip("lm_head")), r"lm_head.*(checksum|corrupt|decod|zstd)"),
    Case("a truncated chunk, on load", _load(_truncate("layers.mlp.down")), r"layers\.mlp\.down|layers/mlp/down"),
    Case("a chunk that cannot be read, on load", _load(_unreadable("embed.embedding")), r"params.*embed\.embedding"),
    Case("a chunk that cannot be read, on --to-hf", _to_hf(_unreadable("embed.embedding")), r"params.*embed\.embedding"),
    Case("an array directory removed, on load", _load(_no_params), r"lm_head"),
]
