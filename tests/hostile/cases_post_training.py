"""QLoRA and DPO inputs: run-config keys (lora.base_quant, objective, dpo.beta) and preference records for
`python -m llama_jax.data prepare`."""

import json

from hostile import Case


def _build(*overrides):
    def run(tmp):
        from llama_jax.training import run_config
        return run_config.build("", list(overrides))
    return run


def _prepare(*records):
    """`python -m llama_jax.data prepare` on a .jsonl of `records`, with a byte tokenizer (no files needed)."""
    def run(tmp):
        from unittest import mock

        from llama_jax.training import data

        class Bytes:
            vocab_size, bos_id, eos_id = 259, 1, 2

            def encode(self, text, *, bos=True, eos=False):
                return [1] * bos + [b + 3 for b in text.encode()] + [2] * eos

        src = tmp / "prefs.jsonl"
        src.write_text("\n".join(json.dumps(r) for r in records) + "\n")
        with mock.patch.object(data, "load_text_tokenizer", lambda path: Bytes()):
            return data.main(["prepare", "--tokenizer", "unused", "--out", str(tmp / "out"), str(src)])
    return run


GOOD = {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}

CASES = [
    Case("lora.base_quant is not a known format", _build("lora.rank=4", "lora.base_quant=nf5"), r"lora\.base_quant='nf5'.*int8 or nf4"),
    Case("a quantized base without LoRA", _build("lora.base_quant=nf4"), r"lora\.base_quant=nf4.*lora\.rank"),
    Case("objective is not sft or dpo", _build("objective=ppo"), r"objective='ppo'"),
    Case("dpo.beta is not positive", _build("objective=dpo", "dpo.beta=0"), r"dpo\.beta=0"),
    Case("a DPO micro-batch splits a pair", _build("objective=dpo", "batch_size=6", "grad_accum=2"), r"must be even"),
    Case("a preference record without a prompt", _prepare({"chosen": "a", "rejected": "b"}), r"record 0.*'prompt'"),
    Case("a reply that is a number", _prepare({"prompt": "Hi", "chosen": 3, "rejected": "b"}), r"record 0: 'chosen'.*string"),
    Case("a plain record after preference pairs", _prepare(GOOD, {"text": "plain"}), r"record 1.*'chosen' and 'rejected'"),
]
