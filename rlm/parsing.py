"""Extracting code blocks and final answers from the root model's replies.

Code blocks are fenced ```repl (the name the system prompt teaches) or ```python /
```py. FINAL and FINAL_VAR are functions the code calls, so no regex can misread an
answer; the text forms below are only a fallback for a root model that writes
``FINAL(...)`` in prose instead of in code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_FENCE = re.compile(
    r"^[ \t]*```[ \t]*(?P<lang>repl|python|py|python3)?[ \t]*\n(?P<body>.*?)^[ \t]*```[ \t]*$",
    re.DOTALL | re.MULTILINE,
)
_ANY_FENCE = re.compile(r"^[ \t]*```.*?^[ \t]*```[ \t]*$", re.DOTALL | re.MULTILINE)
_FINAL_VAR = re.compile(r"^[ \t]*FINAL_VAR\(\s*['\"]?(?P<name>[A-Za-z_][A-Za-z0-9_]*)['\"]?\s*\)", re.MULTILINE)
_FINAL = re.compile(r"^[ \t]*FINAL\((?P<answer>.*)\)[ \t]*$", re.DOTALL | re.MULTILINE)


@dataclass(frozen=True)
class FinalInText:
    """A final answer found in plain text: ``kind`` is "FINAL" (value is the answer) or
    "FINAL_VAR" (value is a variable name)."""

    kind: str
    value: str


def find_code_blocks(text: str) -> list[str]:
    """The bodies of the ```repl / ```python blocks in ``text``, in order.

    A fence with no language counts too when the reply has no labelled block, since
    models often drop the label.
    """
    labelled = [m.group("body") for m in _FENCE.finditer(text) if m.group("lang")]
    if labelled:
        return [b for b in labelled if b.strip()]
    return [m.group("body") for m in _FENCE.finditer(text) if m.group("body").strip()]


def find_final_in_text(text: str) -> FinalInText | None:
    """A ``FINAL(...)`` or ``FINAL_VAR(name)`` written at the start of a line outside
    code blocks, or None."""
    prose = _ANY_FENCE.sub("", text)
    m = _FINAL_VAR.search(prose)
    if m:
        return FinalInText("FINAL_VAR", m.group("name"))
    m = _FINAL.search(prose)
    if m:
        answer = m.group("answer").strip()
        if len(answer) >= 2 and answer[0] == answer[-1] and answer[0] in "'\"":
            answer = answer[1:-1]
        return FinalInText("FINAL", answer)
    return None
