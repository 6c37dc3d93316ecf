"""Every hostile / broken input in tests/hostile/cases_*.py is refused with one clear line (no traceback)."""

import importlib
import pkgutil
import re

import pytest

import hostile
from llama_jax.errors import LlamaJaxError


def _all_cases():
    cases = []
    for info in pkgutil.iter_modules(hostile.__path__):
        if info.name.startswith("cases_"):
            module = importlib.import_module(f"hostile.{info.name}")
            cases += [pytest.param(c, id=f"{info.name[6:]}:{c.name}") for c in module.CASES]
    return cases


@pytest.mark.parametrize("case", _all_cases())
def test_refused_with_one_line(case, tmp_path, capsys):
    try:
        case.run(tmp_path)
    except LlamaJaxError as e:
        message = str(e)
    except SystemExit as e:
        if isinstance(e.code, str):
            message = e.code
        else:
            assert e.code not in (0, None), "exit status 0 on bad input"
            message = capsys.readouterr().err.strip()
    else:
        pytest.fail("accepted a bad input")
    message = message.strip()
    assert message and "\n" not in message, f"not one line: {message!r}"
    assert "Traceback" not in message
    assert re.search(case.expect, message, re.IGNORECASE), f"{message!r} does not match {case.expect!r}"
