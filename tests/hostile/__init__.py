"""Hostile and broken inputs, one table row each: see tests/test_hostile.py.

A case builds its files under a fresh temporary folder and runs one entry point in-process (a command line's
`main(argv)` or a library call). It must refuse with ONE line that matches `expect` (a regular expression,
searched case-insensitively): a `LlamaJaxError`, or a command line's `SystemExit` with a message (or a non-zero
code after printing the line to stderr). Adding a case is one line in the `cases_<wing>.py` file of the wing
that reads the input; `fixtures.py` holds the small builders (a tiny checkpoint, a tampered safetensors file).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Case:
    name: str                          # test id: what is wrong with the input
    run: Callable[[Path], object]      # build files under the tmp folder, then call the entry point
    expect: str                        # regex the one-line error must contain
