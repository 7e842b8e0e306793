"""A batch-mode job's crash state: every batch it submitted, written before it waits.

The journal is an append-only JSONL file (``STATE_DIR/state.jsonl``), one fsynced line
per event, so a job killed at any moment (even ``kill -9``) leaves a readable record:

- ``submitting``: a file is about to be submitted: its token, endpoint, model, the keys
  of its calls (their custom_ids), the task that first asked each one and, when some
  call has parameters beyond its model (a response format...), each call's parameters
  (stored once per distinct set), which reading its reply may need;
- ``submitted``: the provider accepted the token's file as batch ``batch``;
- ``collected``: the batch ended and its replies are in the reply store;
- ``live``: calls answered by the live fallback (their replies are in the store too).

Re-running the job reads it back (``Journal.load``): batches submitted and not yet
collected are polled and collected again, a submission cut off between its create and
its record is looked for at the provider, and the keys of every call the job paid for
are known, so nothing is submitted twice. It must not hold the batches' lifecycle
(``rlm.batchapi.collector``) or replies (they go to the reply store).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Journal", "Submission"]

FILE_NAME = "state.jsonl"


@dataclass
class Submission:
    """One file the job submitted (or was about to): what is known of it."""

    token: str
    endpoint: str
    model: str
    keys: list[str]
    tasks: list[str | None]
    at: float
    batch: str | None = None
    collected: bool = False
    params: list[dict[str, Any] | None] | None = None


@dataclass
class JournalState:
    """What a journal says: the submissions by token and the keys answered live."""

    submissions: dict[str, Submission] = field(default_factory=dict)
    live: set[str] = field(default_factory=set)

    def open_batches(self) -> list[Submission]:
        """Submissions the provider accepted and the job has not collected."""
        return [s for s in self.submissions.values() if s.batch and not s.collected]

    def unconfirmed(self) -> list[Submission]:
        """Submissions cut off between the provider's create and the journal's record."""
        return [s for s in self.submissions.values() if s.batch is None]

    def paid(self) -> dict[str, str]:
        """Every key the job paid for, and how: "batch" or "live"."""
        paid = {key: "batch" for s in self.submissions.values() if s.batch for key in s.keys}
        paid.update(dict.fromkeys(self.live, "live"))
        return paid


class Journal:
    """The append-only state file of one job's batches; writes are fsynced, thread-safe."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / FILE_NAME
        self._lock = threading.Lock()
        self._fh: Any = None

    def load(self) -> JournalState:
        """Read the journal back (empty when there is none); a torn last line is skipped."""
        state = JournalState()
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return state
        for line in raw.split(b"\n"):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash: its event never completed
            kind = event.get("t")
            if kind == "submitting":
                distinct, which = event.get("params"), event.get("param_index")
                params = ([distinct[i] for i in which]
                          if isinstance(distinct, list) and isinstance(which, list) else None)
                state.submissions[event["token"]] = Submission(
                    event["token"], event.get("endpoint", ""), event["model"],
                    list(event["keys"]), list(event.get("tasks") or [None] * len(event["keys"])),
                    float(event.get("at") or 0.0), params=params)
            elif kind == "submitted":
                sub = state.submissions.get(event["token"])
                if sub is not None:
                    sub.batch = event["batch"]
            elif kind == "collected":
                for sub in state.submissions.values():
                    if sub.batch == event["batch"]:
                        sub.collected = True
            elif kind == "live":
                state.live.update(event.get("keys") or ())
        return state

    def submitting(self, token: str, endpoint: str, model: str, keys: list[str],
                   tasks: list[str | None],
                   params: list[dict[str, Any] | None] | None = None) -> None:
        """Record a file about to be submitted (before the provider's create)."""
        event: dict[str, Any] = {"t": "submitting", "token": token, "endpoint": endpoint,
                                 "model": model, "keys": keys, "tasks": tasks, "at": time.time()}
        if params and any(p and set(p) - {"model"} for p in params):
            distinct: dict[str, int] = {}
            for p in params:
                distinct.setdefault(json.dumps(p, sort_keys=True), len(distinct))
            event["params"] = [json.loads(text) for text in distinct]
            event["param_index"] = [distinct[json.dumps(p, sort_keys=True)] for p in params]
        self._write(event)

    def submitted(self, token: str, batch_id: str) -> None:
        """Record the batch id the provider gave the token's file."""
        self._write({"t": "submitted", "token": token, "batch": batch_id, "at": time.time()})

    def collected(self, batch_id: str) -> None:
        """Record that a batch's replies are in the store."""
        self._write({"t": "collected", "batch": batch_id, "at": time.time()})

    def sent_live(self, keys: Iterable[str]) -> None:
        """Record calls the live fallback answered."""
        self._write({"t": "live", "keys": list(keys), "at": time.time()})

    def _write(self, event: dict[str, Any]) -> None:
        data = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        with self._lock:
            if self._fh is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._fh = self.path.open("ab")
            self._fh.write(data)
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        """Close the file (the next write opens it again)."""
        with self._lock:
            fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()
