"""Tolerant readers of events and results, and the number and text formats every face shares.

Logs may be old, cut short or hand-edited, so every reader here accepts missing or
mistyped fields and falls back to a default instead of raising. Their text is untrusted
(documents, model replies, cell output): ``clean_text`` makes it inert for a terminal,
and every terminal face passes what it shows through it, as rich ``Text``, never markup."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

Event = Mapping[str, Any]


def field_of(obj: Any, name: str, default: Any = None) -> Any:
    """A field of a dict or an attribute of an object, whichever ``obj`` is."""
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        value = obj.get(name, default)
    else:
        value = getattr(obj, name, default)
    return default if value is None else value


def as_num(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def as_int(value: Any) -> int | None:
    n = as_num(value)
    return None if n is None else int(n)


def as_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


# What a terminal would act on instead of showing: the C0 controls but tab and newline
# (ESC starts OSC 52 clipboard writes, OSC 0 titles, OSC 8 links, CSI screen clears and
# SGR hidden text; CR overwrites a line), DEL, the C1 controls (0x9b is a one-byte CSI),
# and the bidirectional overrides that reorder what is shown.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean_text(value: Any) -> str:
    """Untrusted text made inert for a terminal: each control character is shown escaped
    (ESC as ``\\x1b``), so escape sequences are seen and do nothing; newlines and tabs
    stay, and a CR of a CRLF line end is dropped."""
    text = as_text(value)
    if not _CONTROL.search(text):
        return text
    return _CONTROL.sub(_escaped, text.replace("\r\n", "\n"))


def fmt_int(value: Any) -> str:
    n = as_int(value)
    return "—" if n is None else f"{n:,}"


def fmt_cost(value: Any) -> str:
    if value == "unpriced":  # a model without a price: unknown, never a misleading $0
        return "unpriced"
    n = as_num(value)
    if n is None:
        return "—"
    # Sub-cent costs are the common case for cheap sub-models; two decimals would read $0.00.
    return f"${n:,.2f}" if n >= 1 else f"${n:.4f}"


def fmt_time(value: Any) -> str:
    n = as_num(value)
    if n is None:
        return "—"
    if n < 0.1:
        return f"{n * 1000:.0f} ms"  # fast cells would all read "0.00 s"
    if n < 60:
        return f"{n:.2f} s"
    minutes, seconds = divmod(int(round(n)), 60)
    return f"{minutes} m {seconds:02d} s"


def preview(value: Any, limit: int = 120) -> str:
    text = " ".join(as_text(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def head_tail(text: str, max_lines: int, max_chars: int) -> tuple[str, str | None, str]:
    """Split a long text into (head, what was omitted, tail); short text is all head."""
    lines = text.splitlines(keepends=True)
    if len(lines) > max_lines:
        keep_head = max(1, max_lines * 2 // 3)
        keep_tail = max(1, max_lines - keep_head)
        head, tail = "".join(lines[:keep_head]), "".join(lines[-keep_tail:])
        omitted = f"… {len(lines) - keep_head - keep_tail:,} lines omitted …\n"
        if len(head) + len(tail) <= max_chars:
            return head, omitted, tail
    if len(text) > max_chars:
        keep_head = max_chars * 2 // 3
        keep_tail = max_chars - keep_head
        omitted = f"\n… {len(text) - max_chars:,} characters omitted …\n"
        return text[:keep_head], omitted, text[-keep_tail:]
    return text, None, ""


# Root replies carry their code in fences; the cells show that code highlighted right
# after, so the reply's prose keeps only a marker instead of the code twice.
_CODE_FENCE = re.compile(
    r"^[ \t]*```[ \t]*(?:repl|python|py|python3)?[ \t]*\n.*?^[ \t]*```[ \t]*$",
    re.DOTALL | re.MULTILINE,
)


def prose_of(content: str, markdown: bool = True, first_cell: int = 1) -> str:
    """The root's text with its code fences replaced by markers naming their cells
    (numbered from ``first_cell``); empty when the text was nothing but code."""
    if not _CODE_FENCE.search(content):
        return content.strip()
    count = first_cell - 1

    def marker(_: re.Match[str]) -> str:
        nonlocal count
        count += 1
        # Its own paragraph, so Markdown does not run it into the sentence before.
        return f"\n\n*(code → cell {count})*\n\n" if markdown else f"\n\n(code → cell {count})\n\n"

    if not _CODE_FENCE.sub("", content).strip():
        return ""
    return re.sub(r"\n{3,}", "\n\n", _CODE_FENCE.sub(marker, content)).strip()


def run_key(event: Event) -> str:
    # A child run's events are forwarded into the parent's trajectory with the parent's
    # run_id and the child's own id in ``child_run``.
    return as_text(event.get("child_run") or event.get("run_id"))


def depth_of(event: Event) -> int:
    return max(0, as_int(event.get("depth")) or 0)


class CellNumbers:
    """Numbers a run's cells 1, 2, 3... across iterations, the way people refer to them.

    Events number cells within their iteration (``index`` from 0), so the first cell of
    every iteration would read "cell 1". This counts them per run instead; a cell and its
    result get the same number.
    """

    def __init__(self) -> None:
        self._numbers: dict[tuple[str, int | None, int | None], int] = {}
        self._count: dict[str, int] = {}

    def number(self, event: Event) -> int:
        """The run-wide number of the cell this ``cell``/``cell_result`` event is about."""
        key = (run_key(event), as_int(event.get("iteration")), as_int(event.get("index")))
        found = self._numbers.get(key)
        if found is None:
            found = self._numbers[key] = self._count.get(key[0], 0) + 1
            self._count[key[0]] = found
        return found

    def next_number(self, event: Event) -> int:
        """The number the next new cell of this event's run will get."""
        return self._count.get(run_key(event), 0) + 1

    def forget(self, key: str) -> None:
        """Drop a finished run's numbers."""
        self._count.pop(key, None)
        for k in [k for k in self._numbers if k[0] == key]:
            del self._numbers[k]


def plural(n: int, word: str) -> str:
    """``3 sub-calls``, ``1 sub-call``."""
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def sub_calls_text(sub_calls: int | None, cached: int | None) -> str:
    """"12 sub-calls", or "12 sub-calls (10 cached)" when the cache answered some."""
    text = plural(sub_calls or 0, "sub-call")
    return f"{text} ({cached:,} cached)" if cached else text


def cell_number(event: Event) -> int:
    # The engine numbers cells from 0; people count from 1.
    index = as_int(event.get("index"))
    return 1 if index is None else index + 1


def usage_total_tokens(usage: Any) -> int | None:
    total = as_int(field_of(usage, "total_tokens"))
    if total:
        return total
    prompt, completion = as_int(field_of(usage, "prompt_tokens")), as_int(field_of(usage, "completion_tokens"))
    if prompt is None and completion is None:
        return total
    return (prompt or 0) + (completion or 0)


def token_notes(usage: Any) -> str:
    """What a turn's usage says beyond its token counts, for its stats line: "62% cached"
    (prompt tokens the provider's cache served) and "1,024 reasoning"; "" when neither."""
    prompt = as_int(field_of(usage, "prompt_tokens"))
    cached = as_int(field_of(usage, "cached_input_tokens"))
    reasoning = as_int(field_of(usage, "reasoning_tokens"))
    notes = []
    if cached and prompt:
        notes.append(f"{cached / prompt:.0%} cached")
    if reasoning:
        notes.append(f"{reasoning:,} reasoning")
    return " · ".join(notes)




def schema_issues_text(event: Event, limit: int = 3) -> str:
    """An ``answer_invalid`` event's issues as one line: "path: expected X, received Y; ..."."""
    errors = event.get("errors")
    if not isinstance(errors, list):
        return ""
    shown = [
        f"{as_text(e.get('path'))}: expected {as_text(e.get('expected'))}, received {as_text(e.get('received'))}"
        for e in errors[:limit]
        if isinstance(e, Mapping)
    ]
    more = len(errors) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")
