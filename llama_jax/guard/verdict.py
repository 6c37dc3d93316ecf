"""Reading a Llama Guard answer: "safe", or "unsafe" and a line of violated category codes ("S1,S10").

An answer that is neither is reported as malformed (`safe` None, `malformed` says why), never guessed.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Collection, List, Optional

_CODE = re.compile(r"^[A-Z]+\d+$")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """safe: True / False, or None when the answer is malformed; categories: the violated codes ("S1", ...);
    p_unsafe: P(unsafe) / (P(unsafe) + P(safe)) at the answer's first token (nan where not scored); raw: the
    model's answer; malformed: why the answer could not be read, else None."""

    safe: Optional[bool]
    categories: List[str]
    p_unsafe: float
    raw: str
    malformed: Optional[str] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_verdict(text: str, p_unsafe: float = float("nan"), known: Optional[Collection[str]] = None) -> Verdict:
    """The model's answer -> Verdict. `known`: the category codes the prompt listed (others are malformed)."""
    lines = [line.strip() for line in text.strip().split("\n")]
    lines = [line for line in lines if line]

    def bad(why: str) -> Verdict:
        return Verdict(None, [], p_unsafe, text, why)

    if not lines:
        return bad("empty answer; expected 'safe' or 'unsafe'")
    if lines[0] == "safe":
        if len(lines) > 1:
            return bad(f"'safe' followed by {lines[1]!r}; expected nothing after 'safe'")
        return Verdict(True, [], p_unsafe, text)
    if lines[0] != "unsafe":
        return bad(f"first line {lines[0]!r}; expected 'safe' or 'unsafe'")
    if len(lines) != 2:
        return bad("'unsafe' without a line of categories" if len(lines) == 1
                   else f"{len(lines)} lines; expected 'unsafe' and one line of categories")
    codes = [c.strip() for c in lines[1].split(",")]
    wrong = [c for c in codes if not _CODE.match(c) or (known is not None and c not in known)]
    if wrong:
        return bad(f"categories line {lines[1]!r}: {', '.join(map(repr, wrong))} "
                   + ("not listed in the prompt" if known is not None and all(_CODE.match(c) for c in wrong)
                      else "not a category code such as S1"))
    return Verdict(False, codes, p_unsafe, text)
