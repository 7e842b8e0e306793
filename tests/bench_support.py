"""Test support for ``rlm bench``: a reference solver and FakeLLMServer models that use it.

The reference solver reads only what a model is shown (the context text and the
query), never the generator's internals, so solving every generated task exactly
proves each task is well posed. The fake models built on it:

- ``bench_model`` plays the root model for bench tasks (any request with a system
  message): it answers with a ```repl block that solves the task in the sandbox,
  with regexes for the RULER families and ``llm_query_batch`` fan-out over chunks of
  records for the OOLONG families; and it plays the direct call (a request without a
  system message) by solving the whole prompt it was sent.
- ``sub_model`` labels the records of one chunk for the root's sub-queries.

``benchmarks/bench_quality.py`` imports this module to time ``rlm bench run`` offline.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from typing import Any

from rlm.testing import FakeLLMServer

ROOT = "bench-root"
SUB = "bench-sub"
LABEL_COUNTS = "LABEL COUNTS"
USER_LABELS = "USER LABELS"

# -- the reference solver -----------------------------------------------------------


def classify(question: str) -> str:
    """The coarse TREC label of a generated question, from its wording alone."""
    q = question.strip()
    if re.search(r"\bstand for\b|\bfull form\b|\bacronym\b", q):
        return "abbreviation"
    if q.startswith("Who "):
        return "human being"
    if q.startswith(("Where ", "In which city", "What country")):
        return "location"
    if q.startswith(("How many", "When ", "How much", "How long", "How old")):
        return "numeric value"
    if q.startswith(("Why ", "How does", "What is the difference", "What is the meaning")):
        return "description and abstract concept"
    return "entity"


_RECORD = re.compile(r"^Date: [^|]+\|\| User: (\d+) \|\| Instance: (.+)$", re.MULTILINE)


def records(text: str) -> list[tuple[str, str]]:
    """(user, label) for every record line in ``text``."""
    return [(m.group(1), classify(m.group(2))) for m in _RECORD.finditer(text)]


def qualified_users(user_labels: dict[str, set[str]], query: str) -> list[str]:
    """Users with at least one question of either label the pairs query names."""
    wanted = set(re.findall(r"the label '([^']+)' or '([^']+)'", query)[0])
    return sorted(u for u, labels in user_labels.items() if labels & wanted)


def solve(context: str, query: str) -> Any:
    """The expected answer of a generated task, worked out from its text alone."""
    m = re.search(r"What is the special magic number for (\S+)\?", query)
    if m:
        return re.search(rf"magic numbers for {re.escape(m.group(1))} is: (\d+)", context).group(1)
    m = re.search(r"What are all the special magic numbers for (\S+)\?", query)
    if m:
        return sorted(re.findall(rf"magic numbers for {re.escape(m.group(1))} is: (\d+)", context))
    m = re.search(r"assigned the value (\d+)", query)
    if m:
        holds = {a for a, b in re.findall(r"VAR (\w+) = (\d+)\.", context) if b == m.group(1)}
        links = re.findall(r"VAR (\w+) = VAR (\w+)\.", context)
        grew = True
        while grew:
            new = {a for a, b in links if b in holds} - holds
            holds |= new
            grew = bool(new)
        return sorted(holds)
    if "most common words" in query:
        counts = Counter(re.findall(r"^\d+\. (\w+)$", context, re.MULTILINE))
        return sorted(w for w, _ in counts.most_common(10))
    if "List all pairs of user ids" in query:
        users: dict[str, set[str]] = defaultdict(set)
        for user, label in records(context):
            users[user].add(label)
        good = qualified_users(users, query)
        return [f"({a}, {b})" for i, a in enumerate(good) for b in good[i + 1:]]
    counts = Counter(label for _, label in records(context))
    m = re.search(r"have the label '([^']+)'", query)
    if m:
        return counts[m.group(1)]
    ranked = sorted(counts, key=lambda label: counts[label])
    return ranked[-1] if "most common" in query else ranked[0]


def answer_text(value: Any) -> str:
    """How the fake models state an answer: lists one item a line, the rest as text."""
    if isinstance(value, list):
        return "\n".join(value)
    return f"Answer: {value}"


# -- the fake models -------------------------------------------------------------------


def _query_of(messages: list[dict[str, Any]]) -> str:
    first = next(m["content"] for m in messages if m.get("role") == "user")
    return first.split("Query: ", 1)[1].rsplit("\n\nStart by looking", 1)[0]


# REPL code that solves each kind of task in the sandbox; the query is embedded as a
# literal and the code calls the sub-model for every record label.
_ROOT_CODE = {
    "regex": '''import re
found = re.findall(PATTERN, context)
FINAL("\\n".join(sorted(set(found))))''',
    "vartrack": '''import re
holds = {a for a, b in re.findall(r"VAR (\\w+) = (\\d+)\\.", context) if b == VALUE}
links = re.findall(r"VAR (\\w+) = VAR (\\w+)\\.", context)
for _ in range(len(links)):
    holds |= {a for a, b in links if b in holds}
FINAL("\\n".join(sorted(holds)))''',
    "cwe": '''import collections, re
counts = collections.Counter(re.findall(r"^\\d+\\. (\\w+)$", context, re.MULTILINE))
FINAL("\\n".join(sorted(w for w, _ in counts.most_common(10))))''',
    "labels": '''import json
lines = context.splitlines()
chunks = ["\\n".join(lines[i:i + 150]) for i in range(0, len(lines), 150)]
replies = llm_query_batch([HEADER + "\\n" + c for c in chunks])
parts = [json.loads(r) for r in replies]
''',
}


def root_code(query: str) -> str:
    """The ```repl block the fake root answers a bench query with."""
    m = re.search(r"special magic numbers? for (\S+)\?", query)
    if m:
        pattern = rf"magic numbers for {re.escape(m.group(1))} is: (\d+)"
        code = _ROOT_CODE["regex"].replace("PATTERN", repr(pattern))
    elif "assigned the value" in query:
        value = re.search(r"assigned the value (\d+)", query).group(1)
        code = _ROOT_CODE["vartrack"].replace("VALUE", repr(value))
    elif "most common words" in query:
        code = _ROOT_CODE["cwe"]
    elif "List all pairs of user ids" in query:
        wanted = set(re.findall(r"the label '([^']+)' or '([^']+)'", query)[0])
        code = _ROOT_CODE["labels"].replace("HEADER", repr(USER_LABELS)) + f'''users = {{}}
for part in parts:
    for user, labels in part.items():
        users.setdefault(user, set()).update(labels)
good = sorted(u for u, labels in users.items() if labels & {wanted!r})
FINAL("\\n".join(f"({{a}}, {{b}})" for i, a in enumerate(good) for b in good[i + 1:]))'''
    else:
        code = _ROOT_CODE["labels"].replace("HEADER", repr(LABEL_COUNTS)) + '''counts = {}
for part in parts:
    for label, n in part.items():
        counts[label] = counts.get(label, 0) + n
'''
        m = re.search(r"have the label '([^']+)'", query)
        if m:
            code += f'FINAL("Answer: " + str(counts.get({m.group(1)!r}, 0)))'
        else:
            pick = "max" if "most common" in query else "min"
            code += f'FINAL("Answer: " + {pick}(counts, key=counts.get))'
    return f"Solving it in code.\n```repl\n{code}\n```"


def bench_model(messages: list[dict[str, Any]]) -> str:
    """The root model for bench tasks (requests with a system message) and the direct
    call (without one: the whole context and the query in one user message)."""
    if any(m.get("role") == "system" for m in messages):
        return root_code(_query_of(messages))
    prompt = messages[-1]["content"]
    context, query = prompt.rsplit("\n\n", 1)
    return answer_text(solve(context, query))


def sub_model(messages: list[dict[str, Any]]) -> str:
    """Labels one chunk of records: counts per label, or the labels of each user."""
    text = messages[-1]["content"]
    if text.startswith(LABEL_COUNTS):
        return json.dumps(Counter(label for _, label in records(text)))
    if text.startswith(USER_LABELS):
        users: dict[str, set[str]] = defaultdict(set)
        for user, label in records(text):
            users[user].add(label)
        return json.dumps({u: sorted(labels) for u, labels in users.items()})
    return "NONE"


def bench_server(**options: Any) -> FakeLLMServer:
    """A FakeLLMServer whose ``ROOT`` model is ``bench_model`` and whose other models are
    ``sub_model`` (not started)."""
    return FakeLLMServer(sub_model, scripts={ROOT: [bench_model]}, **options)
