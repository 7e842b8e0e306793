"""A run's trajectory: events appended to a JSONL log as they happen, and read back.

Every event is one JSON object on its own line, written and flushed the moment it
happens, so a run killed half-way leaves a log that is complete up to that point and
readable by ``rlm view``. Event types, with their fields beyond ``type``, ``t``
(seconds since the run started), ``run_id`` and ``depth``:

- ``run_start``: query, context (its description), model, recursive_model, sandbox,
  max_iterations, max_depth, started_at (the wall clock, Unix seconds, at ``t`` = 0 of
  the run's own trajectory), parent_run (a child's parent run id)
- ``root_request``: iteration, messages (the new messages sent this turn)
- ``root_reply``: iteration, content, usage (prompt_tokens, completion_tokens, their
  cached_input_tokens, cache_creation_tokens and reasoning_tokens, cost_usd of this
  turn, and batch_saved_usd when a Batch API answered it), elapsed_s, cached (the reply
  came from the cache), model (the model that answered, as the server named it)
- ``cell``: iteration, index, code
- ``cell_result``: iteration, index, stdout, stderr, error, final, duration_s,
  sub_calls, cached_sub_calls (how many of them the cache answered), truncated
- ``final``: answer, source ("FINAL", "FINAL_VAR" or "text")
- ``budget``: reason (a token, cost or time budget ran out; the run ends after it)
- ``interrupted``: reason (Ctrl-C, SIGTERM, a cancelled task, ``RLM.interrupt``/``close``;
  the interrupted cell's ``cell_result`` comes first, with what it printed)
- ``error``: message
- ``sub_queries``: one call of llm_query or llm_query_batch: iteration, n (its prompts),
  t0 (when the cell asked), calls (a list of ``{"prompt", "reply"}``, each text cut to
  a head and a tail unless ``RLM(record_subcalls="full")``; absent with "none"), child
  (true when each prompt ran as a child RLM, whose own events follow), and timing:
  parallel arrays over the prompts answered one by one (every single call and child
  run, and a cell's first ``TIMED_ITEMS`` prompts of batches): ``ms`` (milliseconds
  from t0 to its reply), ``in``/``out`` (its tokens), ``usd`` (its cost, null when
  unpriced), ``model`` (the answering model, one string when they all agree), ``cached``
  (indices the cache answered), ``failed`` (``[index, error type]`` pairs); and for the
  other prompts, which the client sends as one batch, ``tail_ms`` (when each of them
  was answered, in that order) and ``tail`` (cached, failed, and per model calls, in,
  out, usd). Milliseconds keep a 10,000-prompt batch to a few tens of kilobytes. A
  batch of more than 1,024 prompts reaches the service, and the log, in slices.
- ``compaction``: iteration, t0 (when the summary was asked for), messages and tokens
  before and after, summary, usage (as ``root_reply``'s)
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
from collections.abc import Callable, Iterator, Mapping, Sequence
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
        # The wall clock at t = 0, so offsets become timestamps (spans, exports).
        self.started_at = time.time()
        self._lock = threading.Lock()
        self._file: TextIO | None = None
        if self.log_dir is not None:
            directory = Path(self.log_dir)
            directory.mkdir(parents=True, exist_ok=True)
            self.log_path = directory / f"rlm-{self.run_id}.jsonl"
            self._file = self.log_path.open("a", encoding="utf-8")

    def now(self) -> float:
        """Seconds since the run started, as events' ``t`` counts them."""
        return round(time.monotonic() - self._start, 4)

    def emit(self, type_: str, **fields: Any) -> Event:
        """Record one event: keep it, append and flush it to the log, show it live."""
        event: Event = {
            "type": type_,
            "t": self.now(),
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


class SubCallTimes:
    """The timing of one llm_query / llm_query_batch call, written into its
    ``sub_queries`` event (``t0``, ``n`` and ``timing``; ``read_sub_calls`` reads it back).

    ``time_items(k)`` makes the first ``k`` prompts individually timed: ``item`` records
    when each was answered and what it used, in parallel arrays. The other prompts are
    only summed (``tail_done`` records when each was answered, ``tail_usage`` what they
    used together): a client batch does not say which item finished when.
    """

    def __init__(self, trajectory: Trajectory, n: int) -> None:
        self._now = trajectory.now
        self.t0 = trajectory.now()
        self.n = n
        self.time_items(0)
        self.tail_ms: list[int] = []
        self.tail_models: dict[str, list[Any]] = {}
        self.tail_cached = 0
        self.tail_failed = 0

    def time_items(self, count: int) -> None:
        """Time the first ``count`` prompts one by one."""
        self.ms: list[int | None] = [None] * count
        self.tokens_in = [0] * count
        self.tokens_out = [0] * count
        self.usd: list[float | None] = [0.0] * count
        self.models = [""] * count
        self.cached: set[int] = set()
        self.failed: dict[int, str] = {}

    def _elapsed_ms(self) -> int:
        return round((self._now() - self.t0) * 1000)

    def item(self, index: int, *, tokens_in: int = 0, tokens_out: int = 0,
             usd: float | None = 0.0, model: str = "", cached: bool = False,
             error: BaseException | None = None) -> None:
        """Prompt ``index`` was answered now (or failed with ``error``), with these tokens,
        this cost (None: unpriced) and this answering model. A prompt answered in several
        calls (a typed answer's re-ask) adds them up; its last call says how it ended."""
        self.ms[index] = self._elapsed_ms()
        self.tokens_in[index] += tokens_in
        self.tokens_out[index] += tokens_out
        spent = self.usd[index]
        self.usd[index] = None if usd is None or spent is None else round(spent + usd, 8)
        if model:
            self.models[index] = model
        if cached:
            self.cached.add(index)
        else:
            self.cached.discard(index)
        if error is not None:
            self.failed[index] = type(error).__name__
        else:
            self.failed.pop(index, None)

    def tail_done(self, count: int) -> None:
        """``count`` more of the other prompts were answered now."""
        self.tail_ms.extend([self._elapsed_ms()] * count)

    def tail_usage(self, model: str, *, calls: int, tokens_in: int, tokens_out: int,
                   usd: float | None, cached: int = 0) -> None:
        """The other prompts' calls to ``model`` used this much (summed over calls)."""
        row = self.tail_models.setdefault(model, [0, 0, 0, 0.0])
        row[0] += calls
        row[1] += tokens_in
        row[2] += tokens_out
        row[3] = None if usd is None or row[3] is None else row[3] + usd
        self.tail_cached += cached

    def tail_failures(self, count: int) -> None:
        """``count`` of the other prompts failed."""
        self.tail_failed += count

    def remap(self, sent: Sequence[int], refused: Sequence[int], n: int) -> None:
        """The items were timed by their place among the prompts ``sent``; put them at
        their place among all ``n`` prompts, where the ``refused`` ones failed at once."""
        timed = len(self.ms)
        size = sent[timed - 1] + 1 if timed else 0
        old = (self.ms, self.tokens_in, self.tokens_out, self.usd, self.models)
        cached, failed = self.cached, self.failed
        self.time_items(size)
        new = (self.ms, self.tokens_in, self.tokens_out, self.usd, self.models)
        for position, index in enumerate(sent[:timed]):
            for was, now in zip(old, new, strict=True):
                now[index] = was[position]
        self.cached = {sent[i] for i in cached}
        self.failed = {sent[i]: kind for i, kind in failed.items()}
        for index in refused:
            if index < size:
                self.ms[index] = 0
                self.failed[index] = "LLMError"
            else:
                self.tail_ms.insert(0, 0)
                self.tail_failed += 1
        self.n = n

    def fields(self) -> dict[str, Any]:
        """The event's ``t0``, ``n`` and ``timing`` fields."""
        models = set(self.models) - {""}
        timing: dict[str, Any] = {
            "ms": self.ms,
            "in": self.tokens_in,
            "out": self.tokens_out,
            "usd": self.usd,
            "model": next(iter(models)) if len(models) == 1 else self.models,
            "cached": sorted(self.cached),
            "failed": [[i, kind] for i, kind in sorted(self.failed.items())],
        }
        if self.tail_ms or self.tail_models or self.tail_failed:
            timing["tail_ms"] = self.tail_ms
            timing["tail"] = {
                "cached": self.tail_cached,
                "failed": self.tail_failed,
                "models": {
                    m: {"calls": c, "in": i, "out": o, "usd": None if u is None else round(u, 8)}
                    for m, (c, i, o, u) in self.tail_models.items()
                },
            }
        return {"t0": self.t0, "n": self.n, "timing": timing}


@dataclass(frozen=True, slots=True)
class SubCall:
    """One individually timed prompt of a ``sub_queries`` event (times in seconds since
    the run started; ``error`` the type of the failure, if it failed)."""

    index: int
    start: float
    end: float
    tokens_in: int
    tokens_out: int
    usd: float | None
    model: str
    cached: bool
    error: str | None


@dataclass(frozen=True)
class SubCalls:
    """A ``sub_queries`` event's timing read back: the ``items`` timed one by one, and for
    the rest, when each was answered (``tail_ends``, seconds since the run started) and
    what they used per model (``tail_models``: calls, in, out, usd)."""

    t0: float
    n: int
    child: bool
    items: list[SubCall]
    tail_ends: list[float]
    tail_models: dict[str, dict[str, Any]]
    tail_cached: int
    tail_failed: int


def _num(value: Any, default: float = 0.0) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def read_sub_calls(event: Mapping[str, Any]) -> SubCalls:
    """The timing of a ``sub_queries`` event. A log written before events carried it (or
    a damaged one) reads as one untimed batch ending at the event's ``t``."""
    t_end = _num(event.get("t"))
    t0 = _num(event.get("t0"), t_end)
    timing = event.get("timing")
    calls = event.get("calls")
    n = event.get("n")
    if not isinstance(n, int):
        n = len(calls) if isinstance(calls, list) else 0
    if not isinstance(timing, Mapping):
        return SubCalls(t0, n, bool(event.get("child")), [], [t_end] * n, {}, 0, 0)

    def seq(key: str) -> list[Any]:
        value = timing.get(key)
        return value if isinstance(value, list) else []

    ms = seq("ms")
    tokens_in, tokens_out, usd = seq("in"), seq("out"), seq("usd")
    model = timing.get("model")
    cached = {i for i in seq("cached") if isinstance(i, int)}
    failed = {f[0]: str(f[1]) for f in seq("failed")
              if isinstance(f, list) and len(f) == 2 and isinstance(f[0], int)}
    items = []
    for i, elapsed in enumerate(ms):
        if not isinstance(elapsed, int | float):
            continue
        name = model if isinstance(model, str) else (model[i] if isinstance(model, list)
                                                     and i < len(model) else "")
        cost = usd[i] if i < len(usd) else 0.0
        items.append(SubCall(
            i, t0, t0 + elapsed / 1000, int(_num(tokens_in[i] if i < len(tokens_in) else 0)),
            int(_num(tokens_out[i] if i < len(tokens_out) else 0)),
            None if cost is None else _num(cost), str(name or ""), i in cached, failed.get(i),
        ))
    tail = timing.get("tail") if isinstance(timing.get("tail"), Mapping) else {}
    models = tail.get("models") if isinstance(tail.get("models"), Mapping) else {}
    return SubCalls(
        t0, n, bool(event.get("child")), items,
        [t0 + _num(v) / 1000 for v in seq("tail_ms")],
        {str(m): dict(row) for m, row in models.items() if isinstance(row, Mapping)},
        int(_num(tail.get("cached"))), int(_num(tail.get("failed"))),
    )


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
