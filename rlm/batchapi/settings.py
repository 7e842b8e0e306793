"""How a job uses the providers' Batch APIs: ``BatchSettings``.

One frozen value with every knob of batch mode (how long a file collects calls, how
often batches are polled, retries, the live fallback, replays, where the job's state
lives), checked once when it is made. It must not hold behaviour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlm.errors import ConfigError

__all__ = ["BatchSettings"]


@dataclass(frozen=True)
class BatchSettings:
    """Batch mode's settings (``RLM.run_job(..., batch_api=BatchSettings(...))``).

    - ``window_s``: an open batch file is submitted at most this long after its first
      call (default 10); it goes sooner when full (50,000 calls or 200 MB on OpenAI)
      or when every task of the job is waiting, so the window only bounds how long a
      steady trickle of calls is held back.
    - ``fallback_after_s``: once a batch has waited this long, it is cancelled and what
      it had not answered is sent to the live API at list price (default None: wait
      for the provider's 24 h window).
    - ``max_tries``: submissions of one call before it fails, or goes live when
      ``fallback_after_s`` is set (default 3: lines in the error file and expired
      lines are retried twice).
    - ``poll_min_s`` / ``poll_max_s``: the first and the longest wait between two
      looks at a batch; in between, a batch is looked at about every tenth of its age
      (default 1 s and 60 s).
    - ``max_replays``: replays of a task that do not get further than the one before
      (a cell whose output changes from run to run) before the task is run live
      instead (default 3).
    - ``state_dir``: where the job keeps its crash state, and its reply cache when the
      RLM has none (default: the output file's path plus ``.batch``).
    - ``cancel_wait_s``: on Ctrl-C or SIGTERM, how long to wait for the cancelled
      batches to settle so their finished lines are kept (default 30).
    """

    window_s: float = 10.0
    fallback_after_s: float | None = None
    max_tries: int = 3
    poll_min_s: float = 1.0
    poll_max_s: float = 60.0
    max_replays: int = 3
    state_dir: str | None = None
    cancel_wait_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("window_s", "poll_min_s", "poll_max_s", "cancel_wait_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                math.isfinite(value) and value >= 0
            ):
                raise ConfigError(f"batch {name} must be a number of seconds >= 0, got {value!r}")
        if self.poll_max_s < self.poll_min_s:
            raise ConfigError("batch poll_max_s must be >= poll_min_s")
        fallback = self.fallback_after_s
        if fallback is not None and (isinstance(fallback, bool) or not isinstance(fallback, int | float)
                                     or not fallback >= 0):
            raise ConfigError(
                f"batch fallback_after_s must be seconds >= 0 or None, got {fallback!r}")
        for name in ("max_tries", "max_replays"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"batch {name} must be an int >= 1, got {value!r}")
