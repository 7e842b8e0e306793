"""The job's ledger: what the whole job has spent, against its cost, token and time caps.

Per-run budgets (``RLM(max_cost_usd=...)``) bound one task; these bound the job, at two
grains:

- Per model call (the local backend): ``JobBudget.ledger`` is a ``BudgetLedger`` named
  "job" that every task's run ledger draws from (``rlm.usage.spending_from``). A call
  is sent only when it fits in the job's caps as well as the task's, so with N tasks
  running the job overshoots a cap by at most the calls in flight when it ran out (and
  each by no more than its reply exceeded its reservation), never by N whole tasks.
  Once it is spent, or its ``max_time_s`` deadline passes, every running task stops
  at its next call or cell with ``stopped_reason="budget"`` and an error naming the
  job cap.
- Per task (both backends): ``stop_reason()`` is asked before each task starts and
  each finished task's usage is ``charge``d, so no new task starts once a cap is
  reached. The Ray backend keeps one ``JobBudget`` in a small actor that every worker
  consults (see ``rlm.jobs.ray_backend``).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from rlm.usage import BudgetLedger

__all__ = ["JobBudget"]


class JobBudget:
    """Thread-safe spend counters with optional caps for one job.

    ``charge(cost_usd, tokens)`` adds a finished task's usage; ``stop_reason()`` is
    None while the job may start another task, else the cap that was reached.
    ``ledger`` (None without caps) binds the same caps per model call for runs started
    in ``spending_from(budget.ledger)``.
    """

    def __init__(
        self,
        max_cost_usd: float | None = None,
        max_tokens: int | None = None,
        max_time_s: float | None = None,
        *,
        spent_cost_usd: float = 0.0,
        spent_tokens: int = 0,
    ) -> None:
        self.max_cost_usd = max_cost_usd
        self.max_tokens = max_tokens
        self.max_time_s = max_time_s
        self.cost_usd = spent_cost_usd
        self.tokens = spent_tokens
        self.started = time.monotonic()
        self.interrupted = False
        self._lock = threading.Lock()
        # Without a cap the tasks' runs need no outer ledger (and pay nothing for one).
        self.ledger: BudgetLedger | None = None
        if max_tokens is not None or max_cost_usd is not None or max_time_s is not None:
            self.ledger = BudgetLedger(max_tokens=max_tokens, max_cost_usd=max_cost_usd,
                                       max_time_s=max_time_s, name="job")

    def interrupt(self) -> None:
        """The job is being stopped (Ctrl-C, SIGTERM, cancellation): start nothing more."""
        self.interrupted = True

    def charge(self, cost_usd: float, tokens: int) -> None:
        """Add one finished task's spend."""
        with self._lock:
            self.cost_usd += cost_usd
            self.tokens += tokens

    def remaining_time(self) -> float | None:
        """Seconds left before ``max_time_s`` (None without a time cap)."""
        if self.max_time_s is None:
            return None
        return self.max_time_s - (time.monotonic() - self.started)

    def stop_reason(self) -> str | None:
        """None while another task may start; otherwise which job cap was reached."""
        if self.interrupted:
            return "interrupted"
        if self.ledger is not None and self.ledger.exhausted is not None:
            return self.ledger.describe()
        with self._lock:
            cost, tokens = self.cost_usd, self.tokens
        if self.max_cost_usd is not None and cost >= self.max_cost_usd:
            return f"job max_cost_usd={self.max_cost_usd:g} reached (spent {cost:.4f} USD)"
        if self.max_tokens is not None and tokens >= self.max_tokens:
            return f"job max_tokens={self.max_tokens} reached (used {tokens})"
        left = self.remaining_time()
        if left is not None and left <= 0:
            return f"job max_time_s={self.max_time_s:g} reached"
        return None

    def snapshot(self) -> dict[str, Any]:
        """Spend so far, for the summary."""
        with self._lock:
            return {"cost_usd": self.cost_usd, "tokens": self.tokens}
