"""Llama Guard prompts and command line, and Code Llama infilling, given bad input."""

from hostile import Case

CONV = [{"role": "user", "content": "hi"}]


def _prompt(conversation=CONV, **kwargs):
    def run(tmp):
        from llama_jax.guard import format_prompt
        return format_prompt(conversation, **kwargs)
    return run


def _guard_cli_missing_checkpoint(tmp):
    from llama_jax.guard.__main__ import main
    raise SystemExit(main(["--checkpoint", str(tmp / "nope"), "--user", "hi"]))


def _sp_without_infill_pieces(tmp):
    import io

    import sentencepiece as spm

    from llama_jax.text.sentencepiece_tokenizer import SentencePieceTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["def f(x): return x + 1"] * 50), model_writer=model,
                                   vocab_size=30, model_type="bpe", minloglevel=2)
    (tmp / "tokenizer.model").write_bytes(model.getvalue())
    return SentencePieceTokenizer(str(tmp / "tokenizer.model")).encode_infill("def f(", "): pass")


def _sample_prefix_twice(tmp):
    import sample
    (tmp / "pre.py").write_text("x")
    raise SystemExit(sample.main(["--checkpoint", str(tmp), "--prefix", "x", "--prefix-file", str(tmp / "pre.py")]))


CASES = [
    Case("guard conversation is empty", _prompt([]), r"conversation \[\] is empty"),
    Case("guard message has role system", _prompt([{"role": "system", "content": "x"}]),
         r"message 0 .*expected .*'user' or 'assistant'"),
    Case("guard message content is not text", _prompt([{"role": "user", "content": 3}]), r"message 0 is"),
    Case("guard version 4", _prompt(version=4), r"version=4; expected 1, 2 or 3"),
    Case("guard excludes an unknown category", _prompt(excluded=["S99"]), r"\['S99'\] are not among S1, .*S14"),
    Case("guard excluded is a string", _prompt(excluded="S1"), r"excluded categories 'S1'"),
    Case("guard category is a number", _prompt(categories=[3]), r"category 0 is 3; expected a name"),
    Case("guard role is neither side", _prompt(role="Bot"), r"role='Bot'; expected 'User' or 'Agent'"),
    Case("guard checkpoint is missing", _guard_cli_missing_checkpoint, r"nope.*not a directory"),
    Case("infill tokenizer has no infilling pieces", _sp_without_infill_pieces,
         r"tokenizer\.model: no Code Llama infilling tokens \(▁<PRE>, ▁<SUF>, ▁<MID>, ▁<EOT> missing\)"),
    Case("sample.py --prefix and --prefix-file", _sample_prefix_twice, r"--prefix and --prefix-file: give one"),
]
