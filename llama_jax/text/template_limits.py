"""Limits on rendering a chat template: the template comes with downloaded files, so besides Jinja's immutable
sandbox (no attribute writes, no unsafe calls, range() of at most 100000) it gets a budget of steps and time,
and arithmetic that cannot build a huge number or string in one operation.

A step is one line of the template's compiled code (counted with a trace function on those frames only), so
nested loops and runaway macro recursion stop after MAX_STEPS or MAX_SECONDS. `9**(9**9)` and `"a" * 10**9`
are single operations, refused before they run by `LimitedSandbox.call_binop`.
"""

from __future__ import annotations

import math
import sys
import time

from jinja2.sandbox import ImmutableSandboxedEnvironment

from llama_jax.errors import TokenizerError

MAX_STEPS = 1_000_000      # a real chat template renders a conversation in a few thousand
MAX_SECONDS = 10.0
MAX_POWER_BITS = 4096      # the largest integer a ** may build
MAX_REPEAT = 1 << 20       # the longest string or list a * may build


class LimitedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with ** and * checked for the size of what they would build."""

    intercepted_binops = frozenset(["**", "*"])

    def call_binop(self, context, operator, left, right):
        if operator == "**" and _numbers(left, right) and abs(left) > 1 and right > 0:
            if right * math.log2(abs(left)) > MAX_POWER_BITS:
                raise TokenizerError(f"chat template: {left!r} ** {right!r} would build a number of more than "
                                     f"{MAX_POWER_BITS} bits; refused")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and _numbers(n) and len(seq) * n > MAX_REPEAT:
                    raise TokenizerError(f"chat template: repeating a {type(seq).__name__} of length "
                                         f"{len(seq)} {n!r} times exceeds {MAX_REPEAT} items; refused")
        return super().call_binop(context, operator, left, right)


def _numbers(*values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def render_limited(template, **variables) -> str:
    """`template.render(**variables)` with at most MAX_STEPS template lines and MAX_SECONDS; a TokenizerError
    saying which limit otherwise. Only frames of compiled templates are traced (their file is "<template>")."""
    steps, deadline = 0, time.monotonic() + MAX_SECONDS

    def line(frame, event, arg):
        nonlocal steps
        if event == "line":
            steps += 1
            if steps > MAX_STEPS:
                raise TokenizerError(f"chat template: stopped after {MAX_STEPS} steps (a loop or recursion that "
                                     "does not end?)")
            if steps % 4096 == 0 and time.monotonic() > deadline:
                raise TokenizerError(f"chat template: stopped after {MAX_SECONDS:g} s of rendering")
        return line

    def call(frame, event, arg):
        return line if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(call)
    try:
        return template.render(**variables)
    finally:
        sys.settrace(previous)
