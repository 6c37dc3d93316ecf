"""Tokenizer files and chat templates: settings files that are not objects, an empty tokenizer.model, templates
that fail or would run forever (each fails fast, with one line)."""

from hostile import Case
from hostile.fixtures import write_json


def _load(tmp, **files):
    """load_tokenizer on a folder with a (junk, non-empty) tokenizer.model and `files` (name: JSON)."""
    from llama_jax.text.tokenizer import load_tokenizer

    (tmp / "tokenizer.model").write_bytes(b"\x0a\x00junk")
    for name, obj in files.items():
        write_json(tmp / name.replace("__", "."), obj)
    return load_tokenizer(str(tmp))


def _settings_list(name):
    return lambda tmp: _load(tmp, **{name.replace(".", "__"): ["a", "b"]})


def _empty_model(tmp):
    from llama_jax.text.tokenizer import load_tokenizer

    (tmp / "tokenizer.model").write_bytes(b"")
    return load_tokenizer(str(tmp))


def _template(source):
    def run(tmp):
        from llama_jax.text.chat import render_template
        return render_template(source, [{"role": "user", "content": "hi"}], True, {})
    return run


NESTED = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
FORK = "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}"

CASES = [
    Case("tokenizer_config.json is a list", _settings_list("tokenizer_config.json"),
         r"tokenizer_config\.json: a JSON list, expected an object"),
    Case("special_tokens_map.json is a list", _settings_list("special_tokens_map.json"),
         r"special_tokens_map\.json: a JSON list"),
    Case("generation_config.json is a list", _settings_list("generation_config.json"),
         r"generation_config\.json: a JSON list"),
    Case("an empty tokenizer.model", _empty_model, r"tokenizer\.model: the file is empty"),
    Case("chat template with nested loops", _template(NESTED), r"chat template: stopped after \d+ steps"),
    Case("chat template recursing 2**60 times", _template(FORK), r"chat template: stopped after"),
    Case("chat template computing 9**(9**9)", _template("{{ 9**(9**9) }}"), r"chat template: 9 \*\* 387420489"),
    Case("chat template repeating a string 10**9 times", _template("{{ 'a' * 10**9 }}"), r"repeating a str"),
    Case("chat template dividing by zero", _template("{{ 1 / 0 }}"), r"chat template failed .*ZeroDivisionError"),
    Case("chat template adding a string and a number", _template("{{ 'a' + 1 }}"), r"failed to render: TypeError"),
    Case("chat template recursing forever", _template("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"),
         r"failed to render: RecursionError"),
]
