"""The job's ledger: what the whole job has spent, against its cost, token and time caps.

Per-run budgets (``RLM(max_cost_usd=...)``) bound one task; these bound the job. The
runner asks ``stop_reason()`` before it starts each task and charges each finished
task's usage, so once a cap is reached no new task starts (tasks already running
finish, or are cancelled when the job's time is up). The Ray backend keeps one of these
in a small actor that every worker consults (see ``rlm.jobs.ray_backend``).
"""

from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ["JobBudget"]


class JobBudget:
    """Thread-safe spend counters with optional caps for one job.

    ``charge(cost_usd, tokens)`` adds a finished task's usage; ``stop_reason()`` is
    None while the job may start another task, else the cap that was reached.
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
