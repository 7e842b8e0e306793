"""RLMResult: the outcome of one RLM run, as the caller receives it.

It holds the answer, the typed output, the counts, the usage and the trajectory of a
finished run, and its faces (a dict for JSON, a repr, notebook and terminal views).
It must not hold anything that runs: the loop that fills it is in ``rlm.run``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlm.usage import Usage

__all__ = ["RLMResult"]


@dataclass
class RLMResult:
    """The outcome of one run.

    ``answer`` is the answer text (None when the run gave none), ``iterations`` the root
    turns taken, ``elapsed_s`` the run's wall time in seconds, ``sub_calls`` the
    sub-queries its REPL code made (children's included), ``trajectory`` the run's
    events in memory (the same records a ``log_dir`` file holds) and ``log_path`` that
    file, when ``log_dir=`` was given.

    ``stopped_reason`` is "final" (the code called FINAL/FINAL_VAR, or the root wrote
    one), "max_iterations" (the last-turn answer), "budget" (a cost, token or time
    budget ran out: ``error`` says which), "invalid_answer" (a run with ``schema=``
    whose answer still did not match after ``max_answer_retries``) or "error"
    (``error`` says what failed). ``usage`` has "root" and "sub" ``Usage`` snapshots of
    this run alone.

    With ``schema=``, ``output`` is the validated object (a model instance, list, dict,
    number...) and ``answer`` its JSON text (a str output is the answer as is). After
    "invalid_answer", ``raw_output`` keeps the last value given to FINAL and
    ``validation_errors`` what was wrong with it (dicts of path, expected, received).
    """

    answer: str | None
    iterations: int = 0
    elapsed_s: float = 0.0
    usage: dict[str, Usage] = field(default_factory=lambda: {"root": Usage(), "sub": Usage()})
    sub_calls: int = 0
    stopped_reason: str = "final"
    error: str | None = None
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    log_path: str | None = None
    output: Any = None
    raw_output: Any = None
    validation_errors: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the run produced an answer without an error."""
        return self.answer is not None and self.error is None

    @property
    def total_usage(self) -> Usage:
        """Root and sub-model usage added up."""
        return self.usage["root"] + self.usage["sub"]

    def __repr__(self) -> str:
        answer = self.answer if self.answer is None or len(self.answer) <= 80 else self.answer[:77] + "..."
        total = self.total_usage
        extra = f", error={self.error!r}" if self.error else ""
        return (
            f"RLMResult(answer={answer!r}, stopped_reason={self.stopped_reason!r}, "
            f"iterations={self.iterations}, sub_calls={self.sub_calls}, "
            f"tokens={total.total_tokens}, cost={total.cost_text}, "
            f"elapsed_s={self.elapsed_s:.2f}{extra})"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the trajectory is left out; it is in ``log_path``).

        ``output`` is the validated output as JSON data (null without a schema);
        ``raw_output`` and ``validation_errors`` appear after an invalid answer.
        """
        from pydantic_core import to_jsonable_python

        data: dict[str, Any] = {
            "answer": self.answer,
            "output": to_jsonable_python(self.output),
            "stopped_reason": self.stopped_reason,
            "error": self.error,
            "iterations": self.iterations,
            "sub_calls": self.sub_calls,
            "elapsed_s": round(self.elapsed_s, 3),
            "usage": {k: v.to_dict() for k, v in self.usage.items()},
            "log_path": self.log_path,
        }
        if self.stopped_reason == "invalid_answer":
            data["raw_output"] = to_jsonable_python(self.raw_output, fallback=repr)
            data["validation_errors"] = self.validation_errors
        return data

    def _repr_html_(self) -> str:
        from rlm.display import result_html

        return result_html(self)

    def __rich__(self) -> Any:
        from rlm.display import result_rich

        return result_rich(self)
