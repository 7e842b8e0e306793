"""The offline demo: a needle in a 1,000,000-line haystack, found by a real RLM run.

FakeLLMServer plays both models: the root follows a script (look, chunk and fan out
with ``llm_query_batch``, finish with FINAL_VAR) and the sub-model really reads each
chunk it is sent. Everything else is the real thing: the root loop, the sandboxed
REPL, the async client and its connection pool over loopback HTTP.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from rlm.testing import FakeLLMServer

ROOT_MODEL = "demo-root"
SUB_MODEL = "demo-sub"
QUERY = "What is the secret passphrase hidden somewhere in this log?"

_WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
    "november oscar papa quebec romeo sierra tango uniform victor whiskey xray"
).split()
_NEEDLE = re.compile(r"secret passphrase is: (\S+)")

ROOT_SCRIPT = [
    """Let me look at the context first.
```repl
print(type(context).__name__, f"{len(context):,} characters")
lines = context.splitlines()
print(f"{len(lines):,} lines; the first two:")
print(lines[0])
print(lines[1])
```""",
    """The log is too long to read at once. I will split it into chunks of 10,000 lines and \
ask a sub-model about every chunk at once.
```repl
size = 10_000
chunks = ["\\n".join(lines[i:i + size]) for i in range(0, len(lines), size)]
prompts = [
    "Does this text state a secret passphrase? Reply with the passphrase only, or NONE.\\n\\n" + c
    for c in chunks
]
replies = llm_query_batch(prompts)
hits = [(i, r.strip()) for i, r in enumerate(replies) if r.strip() != "NONE"]
print(f"{len(chunks)} chunks asked; hits: {hits}")
```""",
    """One chunk holds it. Let me verify it in the raw text before answering.
```repl
answer = hits[0][1]
matches = [line for line in lines if answer in line]
print(len(matches), "matching line(s):", matches[:1])
FINAL_VAR("answer")
```""",
]


def sub_model(messages: list[dict]) -> str:
    """The demo's sub-model: reads the chunk it is given and reports a passphrase."""
    text = messages[-1]["content"]
    found = _NEEDLE.search(text if isinstance(text, str) else str(text))
    return found.group(1) if found else "NONE"


@dataclass(frozen=True)
class Haystack:
    """The demo context and what a correct run must find in it."""

    text: str
    needle: str
    needle_line: int
    lines: int


def build_haystack(lines: int = 1_000_000, seed: int = 7) -> Haystack:
    """A log of ``lines`` lines with one passphrase hidden at a random line."""
    rng = random.Random(seed)
    needle = f"{rng.choice(_WORDS)}-{rng.randrange(1000, 9999)}-{rng.choice(_WORDS)}".upper()
    where = rng.randrange(lines // 10, lines - lines // 10)
    words = [" ".join(rng.choices(_WORDS, k=4)) for _ in range(997)]  # a cycle of filler
    rows = [f"{i:07d} INFO worker {i % 13} {words[i % 997]}" for i in range(lines)]
    rows[where] = f"{where:07d} WARN note: the secret passphrase is: {needle}"
    return Haystack("\n".join(rows), needle, where, lines)


def demo_server(latency: float = 0.5) -> FakeLLMServer:
    """A FakeLLMServer playing the scripted root and the chunk-reading sub-model."""
    return FakeLLMServer(sub_model, scripts={ROOT_MODEL: ROOT_SCRIPT}, latency=latency)


@dataclass(frozen=True)
class DemoOutcome:
    """What the demo prints at the end."""

    answer: str | None
    expected: str
    correct: bool
    wall_s: float
    sub_calls: int
    sequential_s: float
    iterations: int


def summarize(result: object, haystack: Haystack, wall_s: float, latency: float) -> DemoOutcome:
    """Compare a run's answer with the hidden needle and compute the summary numbers."""
    answer = getattr(result, "answer", None)
    sub_calls = int(getattr(result, "sub_calls", 0))
    return DemoOutcome(
        answer=answer,
        expected=haystack.needle,
        correct=(answer or "").strip() == haystack.needle,
        wall_s=wall_s,
        sub_calls=sub_calls,
        sequential_s=sub_calls * latency,
        iterations=int(getattr(result, "iterations", 0)),
    )


def speedup_text(outcome: DemoOutcome) -> str:
    """How much the concurrent fan-out saved, in words that stay true for a tiny haystack."""
    ratio = outcome.sequential_s / max(outcome.wall_s, 1e-9)
    if ratio < 1.5:
        return "too few sub-queries for the fan-out to show; try more --lines"
    return f"{ratio:.0f}x longer" if ratio >= 10 else f"{ratio:.1f}x longer"
