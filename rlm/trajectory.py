"""A run's trajectory: events appended to a JSONL log as they happen, and read back.

Every event is one JSON object on its own line, written and flushed the moment it
happens, so a run killed half-way leaves a log that is complete up to that point and
readable by ``rlm view``. Event types, with their fields beyond ``type``, ``t``
(seconds since the run started), ``run_id`` and ``depth``:

- ``run_start``: query, context (its description), model, recursive_model, sandbox,
  max_iterations, max_depth
- ``root_request``: iteration, messages (the new messages sent this turn)
- ``root_reply``: iteration, content, usage (prompt_tokens, completion_tokens,
  cost_usd of this turn), elapsed_s, cached (the reply came from the cache)
- ``cell``: iteration, index, code
- ``cell_result``: iteration, index, stdout, stderr, error, final, duration_s,
  sub_calls, cached_sub_calls (how many of them the cache answered), truncated
- ``final``: answer, source ("FINAL", "FINAL_VAR" or "text")
- ``budget``: reason (a token, cost or time budget ran out; the run ends after it)
- ``interrupted``: reason (Ctrl-C, SIGTERM, a cancelled task, ``RLM.interrupt``/``close``;
  the interrupted cell's ``cell_result`` comes first, with what it printed)
- ``error``: message
- ``sub_queries``: iteration, calls (a list of ``{"prompt", "reply"}``, each text cut to
  a head and a tail unless ``RLM(record_subcalls="full")``; absent with "none")
- ``rate_limited``: role ("root" or "sub"), model, refusals (429s and 503s drawn),
  waited_s (seconds calls were held back by pacing or waited as refusals asked), limits
  (what pacing followed: rpm, tpm, rate_per_s and where each came from); after a root
  turn or a sub-query batch that rate limits held back
- ``run_end``: answer, stopped_reason, iterations, elapsed_s, sub_calls, usage
  (``root`` and ``sub`` usage dicts), error

``subcalls`` events (done, total during a batch) and ``retry`` events (role, model,
failure, attempt, wait_s, refusal: a call about to be tried again) go to live displays
only, not to the log: a 10,000-item batch would otherwise write 10,000 lines.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

Event = dict[str, Any]
EventSink = Callable[[Event], None]

TRANSIENT = frozenset({"subcalls", "retry"})
# The events a run writes; a file with none of them is not a trajectory.
RUN_EVENTS = frozenset({"run_start", "root_request", "root_reply", "cell", "cell_result", "final",
                        "budget", "interrupted", "error", "run_end", "sub_queries",
                        "compaction", "rate_limited"})


def _jsonable(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return _jsonable(to_dict())
    return repr(value)


@dataclass
class Trajectory:
    """Collects a run's events in memory, appends them to a JSONL file, fans them out.

    ``log_dir`` None keeps events in memory only. ``sinks`` are called with each event
    (live displays); a sink that raises is dropped rather than stopping the run.
    """

    log_dir: str | os.PathLike[str] | None = None
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6])
    depth: int = 0
    sinks: list[EventSink] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    log_path: Path | None = None

    def __post_init__(self) -> None:
        self._start = time.monotonic()
        self._lock = threading.Lock()
        self._file: TextIO | None = None
        if self.log_dir is not None:
            directory = Path(self.log_dir)
            directory.mkdir(parents=True, exist_ok=True)
            self.log_path = directory / f"rlm-{self.run_id}.jsonl"
            self._file = self.log_path.open("a", encoding="utf-8")

    def emit(self, type_: str, **fields: Any) -> Event:
        """Record one event: keep it, append and flush it to the log, show it live."""
        event: Event = {
            "type": type_,
            "t": round(time.monotonic() - self._start, 4),
            "run_id": self.run_id,
            "depth": self.depth,
            **{k: _jsonable(v) for k, v in fields.items()},
        }
        with self._lock:
            if type_ not in TRANSIENT:
                self.events.append(event)
                if self._file is not None:
                    self._file.write(json.dumps(event, ensure_ascii=False) + "\n")
                    self._file.flush()
        for sink in list(self.sinks):
            try:
                sink(event)
            except Exception:  # noqa: BLE001 - a broken display must not stop a run
                self.sinks.remove(sink)
        return event

    def close(self) -> None:
        """Close the log file (events stay in memory)."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def cap_text(text: str, limit: int) -> str:
    """``text`` cut to about ``limit`` characters: its head and its tail around a marker
    that says how much was left out (the end of a reply matters as much as its start)."""
    if len(text) <= limit:
        return text
    head = limit // 2
    tail = limit - head
    return f"{text[:head]}\n… {len(text) - limit:,} characters omitted …\n{text[-tail:]}"


def prompt_text(prompt: Any) -> str:
    """A sub-query prompt (a str or a list of chat messages) as one readable text."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        parts = []
        for message in prompt:
            if isinstance(message, dict):
                parts.append(f"[{message.get('role', '?')}] {message.get('content', '')}")
            else:
                parts.append(str(message))
        return "\n\n".join(parts)
    return str(prompt)


def read_log(path: str | os.PathLike[str]) -> list[Event]:
    """Read a JSONL trajectory; a torn last line (a killed run) is skipped, not fatal."""
    return list(iter_log(path))


def is_trajectory(events: list[Any]) -> bool:
    """True when ``events`` (from ``read_log``) hold at least one event a run writes."""
    return any(
        isinstance(e, dict) and e.get("type") in RUN_EVENTS and "run_id" in e for e in events
    )


def iter_log(path: str | os.PathLike[str]) -> Iterator[Event]:
    """Yield the events of a JSONL trajectory in order."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
