"""Scoring functions of ``rlm bench``: how close an answer is to the expected one, 0 to 1.

This module holds the published metrics, re-implemented from their descriptions, and
the table that picks one per task family (``score``). It must not hold generation or
anything that runs a model. Every function takes the expected answer as the tasks
file stores it and the answer text as a method returned it; a missing answer (None)
scores 0.

- ``string_match_all`` and ``string_match_any``: RULER's metrics (Hsieh et al., 2024,
  arXiv:2404.06654; ``string_match_all`` and ``string_match_part`` in its evaluation
  code): the fraction of expected strings found in the answer, case-insensitively, or
  1 when any one is found.
- ``oolong_score``: OOLONG's (Bertsch et al., 2025, arXiv:2511.02817), as the RLM
  paper reports it: a numeric answer y-hat scores 0.75 ** |y - y-hat|, any other answer
  exact match, after taking the part after the last "Answer:" (or colon) the way
  OOLONG's answer parser does.
- ``set_f1`` and ``pairs_f1``: F1 between the expected and the answered set, as the
  RLM paper scores OOLONG-Pairs (Zhang, Kraska and Khattab, 2025, arXiv:2512.24601).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from rlm.errors import ConfigError

__all__ = [
    "SCORERS",
    "extract_answer",
    "oolong_score",
    "pairs_f1",
    "parse_pairs",
    "score",
    "set_f1",
    "string_match_all",
    "string_match_any",
]


def _as_list(expected: str | Sequence[str]) -> list[str]:
    return [expected] if isinstance(expected, str) else [str(e) for e in expected]


def string_match_all(expected: str | Sequence[str], answer: str | None) -> float:
    """The fraction of the expected strings that occur in ``answer``, ignoring case.

    RULER's ``string_match_all`` for one answer: with expected ``["a", "b"]`` an answer
    holding only "a" scores 0.5. An empty expected list scores 1.
    """
    if answer is None:
        return 0.0
    refs = _as_list(expected)
    if not refs:
        return 1.0
    text = answer.lower()
    return sum(1.0 for r in refs if r.lower() in text) / len(refs)


def string_match_any(expected: str | Sequence[str], answer: str | None) -> float:
    """1 when any expected string occurs in ``answer`` (ignoring case), else 0.

    RULER's ``string_match_part`` (used for its QA tasks) for one answer.
    """
    if answer is None:
        return 0.0
    text = answer.lower()
    return 1.0 if any(r.lower() in text for r in _as_list(expected)) else 0.0


_ANSWER_TAG = re.compile(r"answer\s*:", re.IGNORECASE)


def extract_answer(answer: str) -> str:
    """The final answer inside a reply, as OOLONG's parser finds it.

    The text after the last "Answer:" (else after the last colon, when something
    follows it), without markdown bold, brackets, quotes or a final period. A reply
    without either is taken whole.
    """
    text = answer.strip()
    tags = list(_ANSWER_TAG.finditer(text))
    if tags:
        text = text[tags[-1].end():]
    elif ":" in text and text.rsplit(":", 1)[1].strip():
        text = text.rsplit(":", 1)[1]
    text = text.replace("*", "").replace("[", "").replace("]", "").strip()
    return text.strip("'\"`").strip().rstrip(".").strip()


_INT = re.compile(r"-?\d[\d,]*")


def _first_int(text: str) -> int | None:
    match = _INT.search(text)
    if match is None:
        return None
    try:
        return int(match.group().replace(",", ""))
    except ValueError:
        return None


def oolong_score(expected: int | float | str, answer: str | None) -> float:
    """OOLONG's score: 0.75 ** |y - y_hat| for a number, exact match for anything else.

    The answer is first cut down by ``extract_answer``. A numeric answer that holds no
    number scores 0. A label matches ignoring case, spacing and surrounding quotes.
    """
    if answer is None:
        return 0.0
    candidate = extract_answer(answer)
    if isinstance(expected, bool):
        expected = str(expected)
    if isinstance(expected, int | float):
        got = _first_int(candidate)
        if got is None:
            got = _first_int(answer)
        return 0.0 if got is None else float(0.75 ** abs(int(expected) - got))
    return 1.0 if _norm(candidate) == _norm(str(expected)) else 0.0


def _norm(text: str) -> str:
    return " ".join(text.lower().replace("'", " ").replace('"', " ").split())


def set_f1(expected: Iterable[str], predicted: Iterable[str]) -> float:
    """F1 between two sets of items (compared as given): 2PR / (P + R).

    Both empty is a perfect 1; one of them empty is 0.
    """
    want, got = set(expected), set(predicted)
    if not want and not got:
        return 1.0
    hits = len(want & got)
    if hits == 0:
        return 0.0
    precision, recall = hits / len(got), hits / len(want)
    return 2 * precision * recall / (precision + recall)


_PAIR = re.compile(r"\(?\s*(\d+)\s*,\s*(\d+)\s*\)?")


def parse_pairs(text: str) -> set[str]:
    """Every ``(a, b)`` pair of integers in ``text``, normalised to ``"(low, high)"``.

    Parentheses are optional (``12, 34`` counts); a pair of one id with itself is
    dropped, since the task asks for pairs of two users.
    """
    pairs: set[str] = set()
    for m in _PAIR.finditer(text):
        a, b = sorted((int(m.group(1)), int(m.group(2))))
        if a != b:
            pairs.add(f"({a}, {b})")
    return pairs


def pairs_f1(expected: Sequence[str], answer: str | None) -> float:
    """F1 of the pairs listed in ``answer`` against the expected ``"(a, b)"`` pairs."""
    if answer is None:
        return 0.0
    return set_f1(parse_pairs("\n".join(expected)), parse_pairs(answer))


SCORERS: dict[str, Callable[[Any, str | None], float]] = {
    "niah": string_match_all,
    "niah-multikey": string_match_all,
    "niah-multivalue": string_match_all,
    "vartrack": string_match_all,
    "cwe": string_match_all,
    "oolong": oolong_score,
    "pairs": pairs_f1,
}


def score(task: str, expected: Any, answer: str | None) -> float:
    """The score of ``answer`` for a task of family ``task`` (0 to 1; None scores 0)."""
    scorer = SCORERS.get(task)
    if scorer is None:
        raise ConfigError(f"no scorer for task family {task!r}; known: {', '.join(SCORERS)}")
    return float(scorer(expected, answer))
