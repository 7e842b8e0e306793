"""A scripted RLM for offline runs: a root that works on any context and query, and
sub-models that answer from the excerpt they are sent.

Holds :func:`rlm_responder`, the default responder of ``python -m rlm.testing``. A root
turn (recognised by the root's system prompt from :mod:`rlm.prompts`) gets code: the
first turn looks at ``context``, cuts it into excerpts by lines and asks
``llm_query_batch`` the query about every excerpt; the next turn finishes with
``FINAL`` holding what the excerpts gave back, so ``rlm run`` ends "final" in two turns.
A sub-query in the format that code writes gets an extractive answer: the excerpt's
sentences that share the most words with the question (for a question with no content
words, the excerpt's opening sentences). ``"ECHO x"`` prompts are echoed, as
:func:`echo_responder` does, so the benchmarks' prompts keep their answers. It must not
hold HTTP or protocol shapes, and it is no model: it only has to be grounded and
deterministic.
"""

from __future__ import annotations

import re
from typing import Any

from rlm import prompts
from rlm.testing.responders import echo_responder, last_user_text, text_of

__all__ = ["SUB_INSTRUCTION", "extract_answer", "rlm_responder"]

# The part of the root's system prompt before any placeholder: stable across formats.
_ROOT_MARKER = prompts.SYSTEM_PROMPT.split("{", 1)[0][:80]
_QUERY_PREFIX = "Query: "
_QUERY_SUFFIX = prompts.FIRST_USER_TEMPLATE.split("{query}", 1)[1].strip().split("\n", 1)[0]
_LAST_TURN = prompts.LAST_TURN_PROMPT[:60]
_COMPACT = prompts.COMPACTION_PROMPT[:60]
_WINDOW = re.compile(r"read about ([\d,_]+) characters")

SUB_INSTRUCTION = "Answer the question from this excerpt only."
NOTHING = "NOTHING RELEVANT"
_SUB = re.compile(
    re.escape(SUB_INSTRUCTION) + r"\nQuestion: (?P<q>.*?)\n\nExcerpt \d+ of \d+:\n(?P<x>.*)\Z",
    re.DOTALL,
)
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_'-]*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n|\n(?=\s*(?:[-*#>|]|\d+\.)\s)")
_STOP = frozenset(
    "a an and are as at be but by can did do does for from had has have how i if in into is "
    "it its me my no not of on or our so than that the their them then there these they this "
    "to was we were what when where which who whom why will with would you your about any "
    "all tell give find show list please".split()
)
_MAX_SENTENCES = 2
_MAX_SENTENCE_CHARS = 240
_MAX_FINDINGS = 6

_FIRST_TURN = '''\
I will look at the context, cut it into excerpts and ask a sub-model about each one.
```repl
query = {query!r}
if isinstance(context, str):
    text = context
elif isinstance(context, dict):
    text = "\\n".join(f"{{key}}: {{value}}" for key, value in context.items())
elif isinstance(context, (list, tuple)):
    text = "\\n".join(str(item) for item in context)
else:
    text = str(context)
print(type(context).__name__, f"{{len(text):,}} characters")
print(text[:300])
size = max(2000, min({cap}, -(-len(text) // 8)))
chunks, current = [], ""
for line in text.splitlines(keepends=True):
    while len(line) > size:
        chunks.append(line[:size])
        line = line[size:]
    if current and len(current) + len(line) > size:
        chunks.append(current)
        current = ""
    current += line
if current.strip():
    chunks.append(current)
prompts = [
    f"{instruction}\\nQuestion: {{query}}\\n\\nExcerpt {{i + 1}} of {{len(chunks)}}:\\n{{chunk}}"
    for i, chunk in enumerate(chunks)
]
findings = llm_query_batch(prompts)
for i, finding in enumerate(findings):
    print(f"excerpt {{i + 1}}: {{finding[:200]}}")
```'''

_SECOND_TURN = '''\
I have what every excerpt says; I will put the relevant findings together.
```repl
useful = []
for finding in findings:
    finding = finding.strip() if isinstance(finding, str) else ""
    if finding and finding != {nothing!r} and not finding.startswith("[llm_query error"):
        useful.append(finding)
if useful:
    answer = (
        f"From {{len(chunks)}} excerpt(s) of the context ({{len(text):,}} characters), "
        "the passages that answer the query:\\n"
        + "\\n".join(f"- {{finding}}" for finding in useful[:{limit}])
    )
else:
    answer = (
        f"Nothing in the context ({{len(text):,}} characters, {{len(chunks)}} excerpt(s)) "
        f"answers the query: {{query}}"
    )
FINAL(answer)
```'''


def _words(text: str) -> set[str]:
    return {w.lower().strip("'-") for w in _WORD.findall(text)} - _STOP


def _unfenced(text: str) -> str:
    # Each line of a code block stands alone (a command, not part of a sentence), and
    # the fences themselves say nothing.
    lines: list[str] = []
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            lines.append("")
            continue
        lines.append(line + "\n" if fenced else line)
    return "\n".join(lines)


def _sentences(text: str) -> list[str]:
    out: list[str] = []
    for piece in _SENTENCE_END.split(_unfenced(text)):
        sentence = " ".join(piece.split()).lstrip("#>*-| ").strip()
        if len(_WORD.findall(sentence)) < 4:
            continue
        if len(sentence) > _MAX_SENTENCE_CHARS:
            sentence = sentence[: _MAX_SENTENCE_CHARS - 3].rstrip() + "..."
        out.append(sentence)
    return out


def extract_answer(question: str, excerpt: str) -> str:
    """The excerpt's sentences that share the most content words with ``question`` (at most
    two, in the excerpt's order), its opening sentences when the question has no content
    words, or ``"NOTHING RELEVANT"``."""
    sentences = _sentences(excerpt)
    wanted = _words(question)
    if not wanted:
        chosen = sentences[:_MAX_SENTENCES]
    else:
        scored = [(len(wanted & _words(s)), i) for i, s in enumerate(sentences)]
        best = sorted((item for item in scored if item[0] > 0), key=lambda t: (-t[0], t[1]))
        chosen = [sentences[i] for _, i in sorted(best[:_MAX_SENTENCES], key=lambda t: t[1])]
    return " ".join(chosen) if chosen else NOTHING


def _query_of(messages: list[dict[str, Any]]) -> str:
    for message in messages:
        if isinstance(message, dict) and message.get("role") == "user":
            text = text_of(message.get("content"))
            start = text.rfind(_QUERY_PREFIX)
            if start >= 0:
                start += len(_QUERY_PREFIX)
                end = text.find(_QUERY_SUFFIX, start)
                return text[start:end if end >= 0 else None].strip()
    return ""


def _root_turn(messages: list[dict[str, Any]], system: str) -> str:
    last = last_user_text(messages)
    if last.startswith(_COMPACT):
        return "Summary: the context was cut into excerpts and each was asked the query."
    turns = sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "assistant")
    if last.startswith(_LAST_TURN) or turns >= 2:
        return "FINAL(The scripted offline model could not finish; see the REPL output above.)"
    if turns == 0:
        found = _WINDOW.search(system)
        window = int(re.sub(r"[,_]", "", found.group(1))) if found else 100_000
        cap = max(2000, min(20_000, window // 2))
        return _FIRST_TURN.format(query=_query_of(messages), cap=cap, instruction=SUB_INSTRUCTION)
    return _SECOND_TURN.format(nothing=NOTHING, limit=_MAX_FINDINGS)


def rlm_responder(messages: list[dict[str, Any]]) -> str:
    """Answer as a model driving an RLM would, offline: root turns get the scripted code,
    sub-queries in its excerpt format an extractive answer, ``"ECHO x"`` gives ``"x"``, and
    anything else what :func:`echo_responder` says."""
    last = last_user_text(messages)
    if last.startswith("ECHO "):
        return last[5:]
    first = messages[0] if messages else None
    if isinstance(first, dict) and first.get("role") == "system":
        system = text_of(first.get("content"))
        if system.startswith(_ROOT_MARKER):
            return _root_turn(messages, system)
    found = _SUB.match(last)
    if found:
        return extract_answer(found.group("q"), found.group("x"))
    return echo_responder(messages)
