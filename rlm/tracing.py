"""OpenTelemetry traces of RLM runs, under the GenAI semantic conventions.

A run's trajectory events become spans: ``invoke_agent rlm`` for each run (a child run
nested under the cell that started it), ``chat {model}`` for each root turn, compaction
and sub-query, and ``execute_tool repl`` for each cell. ``SpanBuilder`` holds that
mapping and the limits that keep a trace readable, and writes through a ``SpanWriter``:
``OTelWriter`` sends spans through opentelemetry-api as a run goes (``trace_sink`` is
one more sink of its trajectory), ``rlm.trajectory_otlp`` writes a log's spans as OTLP
JSON afterwards. Span times are the trajectory's own, so both give the same spans.

Nothing here imports opentelemetry until a run is traced. This module must not hold
the events themselves (``rlm.trajectory``) or the OTLP file format
(``rlm.trajectory_otlp``).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from rlm.errors import ConfigError
from rlm.trajectory import Event, SubCall, cap_text, read_sub_calls

__all__ = [
    "CAPTURE_ENV",
    "CONTENT_CAP_CHARS",
    "SUBCALL_SPANS_PER_CELL",
    "TRACE_SUBCALL_SPANS",
    "TRACING_ENV",
    "OTelWriter",
    "SpanBuilder",
    "SpanWriter",
    "capture_content",
    "configure_sdk",
    "provider_name",
    "replay",
    "scope_version",
    "trace_sink",
    "tracing_wanted",
]

# RLM(tracing=None) follows this switch: 1, true, yes or on traces every run.
TRACING_ENV = "RLM_TRACING"
# The GenAI conventions' switch for prompts, replies, code and outputs on spans; off
# by default, since they may hold personal or secret data.
CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
_ON = frozenset({"1", "true", "yes", "on"})
# Values of the capture switch that put content on spans (the newer conventions'
# SPAN_ONLY and SPAN_AND_EVENT included; EVENT_ONLY asks for events, which rlm has none of).
_CAPTURE_ON = _ON | {"span_only", "span_and_event"}

# The first 100 sub-calls of a cell (model calls and child runs) get a span each; the
# rest of that cell's are summed into one ``chat {model}`` span per model (tokens,
# cost, count, latency percentiles) and counted on the cell's span. Past 2,000 such
# spans in one trace, every further sub-call is summed the same way. A backend shows a
# few thousand spans in a trace comfortably; 10,000 under one cell freeze some UIs.
SUBCALL_SPANS_PER_CELL = 100
TRACE_SUBCALL_SPANS = 2_000
# Each captured text (a prompt, a reply, a cell's code or output) is cut to this many
# characters, head and tail: backends cap attribute sizes, and whole replies are in the log.
CONTENT_CAP_CHARS = 16_000

_PROVIDERS = {"anthropic": "anthropic", "openai": "openai", "azure": "azure.ai.openai",
              "gemini": "gcp.gemini"}


@functools.cache
def scope_version() -> str | None:
    """The installed package's version, which names the instrumentation scope of the
    spans (None when run from a source tree that was never installed). Looked up once:
    reading the installed metadata takes milliseconds."""
    from importlib import metadata

    try:
        return metadata.version("rlm-sandbox")
    except metadata.PackageNotFoundError:
        return None


def tracing_wanted(tracing: bool | None) -> bool:
    """Whether runs are traced: ``tracing`` when it is True or False; None follows the
    ``RLM_TRACING`` environment switch (1, true, yes or on). When tracing is on and
    opentelemetry-api is missing, ``ConfigError`` says how to install it."""
    if tracing is not None and not isinstance(tracing, bool):
        raise ConfigError(f"tracing must be True, False or None, got {tracing!r}")
    wanted = tracing if tracing is not None else (
        os.environ.get(TRACING_ENV, "").strip().lower() in _ON
    )
    if wanted and importlib.util.find_spec("opentelemetry") is None:
        how = "tracing=True" if tracing else f"{TRACING_ENV}={os.environ.get(TRACING_ENV)}"
        raise ConfigError(
            f"{how} needs opentelemetry-api: pip install 'rlm-sandbox[otel]' "
            "(and an OpenTelemetry SDK to export the spans)"
        )
    return wanted


def capture_content() -> bool:
    """Whether spans carry message content: the GenAI conventions' switch
    ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` (true, or SPAN_ONLY /
    SPAN_AND_EVENT), off by default."""
    return os.environ.get(CAPTURE_ENV, "").strip().lower() in _CAPTURE_ON


def provider_name(model: str) -> str:
    """``gen_ai.provider.name`` for a model name: its provider prefix (anthropic/,
    azure/, gemini/, openai/), else "openai", the wire format of a bare name."""
    prefix, _, rest = model.partition("/")
    return _PROVIDERS.get(prefix, "openai") if rest else "openai"


def _request_model(model: str) -> str:
    prefix, _, rest = model.partition("/")
    return rest if rest and prefix in _PROVIDERS else model


class SpanWriter(Protocol):
    """Where ``SpanBuilder`` puts spans: ``start`` opens one (``parent`` None: a trace's
    root, under whatever the writer takes as the caller's context) and returns a handle;
    ``end`` sets its last attributes, its error (a low-cardinality type and a message)
    and closes it. Times are Unix nanoseconds; ``kind`` is "internal" or "client"."""

    def start(self, name: str, kind: str, start_ns: int, parent: Any,
              attributes: Mapping[str, Any]) -> Any: ...

    def end(self, span: Any, end_ns: int, attributes: Mapping[str, Any],
            error: str | None = None, message: str | None = None) -> None: ...


@dataclass
class _Summary:
    """Sub-calls of one cell that got no span of their own, summed."""

    count: int = 0
    failed: int = 0
    cached: int = 0
    durations: list[float] = field(default_factory=list)
    first: float | None = None
    last: float | None = None
    # model -> [calls, input tokens, output tokens, USD or None when unpriced]
    models: dict[str, list[Any]] = field(default_factory=dict)

    def span(self, start: float, end: float) -> None:
        self.first = start if self.first is None else min(self.first, start)
        self.last = end if self.last is None else max(self.last, end)
        self.durations.append(max(0.0, end - start))

    def usage(self, model: str, calls: int, tokens_in: int, tokens_out: int,
              usd: float | None) -> None:
        row = self.models.setdefault(model, [0, 0, 0, 0.0])
        row[0] += calls
        row[1] += tokens_in
        row[2] += tokens_out
        row[3] = None if usd is None or row[3] is None else row[3] + usd


@dataclass
class _Cell:
    span: Any
    start: float
    spans: int = 0  # sub-call and child-run spans made under it
    summary: _Summary = field(default_factory=_Summary)


@dataclass
class _Run:
    key: str
    depth: int
    start: float
    traced: bool
    span: Any = None
    model: str = ""
    recursive_model: str = ""
    parent: _Run | None = None
    # The traced cell a summed (untraced) run counts into when it ends.
    summary_cell: _Cell | None = None
    turn: Any = None
    cell: _Cell | None = None
    problem: str | None = None
    ended: bool = False


def _percentile(sorted_values: Sequence[float], p: float) -> float:
    # Nearest rank: the smallest value with at least p of the values at or below it.
    index = max(0, min(len(sorted_values) - 1, math.ceil(p * len(sorted_values)) - 1))
    return sorted_values[index]


def _messages(messages: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Chat messages as the conventions' parts: (system instructions, other messages)."""
    system: list[dict[str, Any]] = []
    rest: list[dict[str, Any]] = []
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, Mapping):
            continue
        text = _capped(message.get("content"))
        if message.get("role") == "system":
            system.append({"type": "text", "content": text})
        else:
            rest.append({"role": str(message.get("role") or "user"),
                         "parts": [{"type": "text", "content": text}]})
    return system, rest


def _capped(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return cap_text(text, CONTENT_CAP_CHARS)


def _text_message(role: str, text: Any) -> str:
    return json.dumps([{"role": role, "parts": [{"type": "text", "content": _capped(text)}]}],
                      ensure_ascii=False)


def _error_type(text: str) -> str:
    """A cell error's low-cardinality type: the exception name it starts its last line
    with (NameError, TimeoutError...), else "_OTHER"."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    head = lines[-1].split(":", 1)[0].strip() if lines else ""
    return head if head.isidentifier() else "_OTHER"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


# A root turn's prompt-cache and reasoning counts, by the GenAI conventions' names where
# they have one (cache reads and writes are counted inside gen_ai.usage.input_tokens).
_TOKEN_DETAILS = (("cached_input_tokens", "gen_ai.usage.cache_read.input_tokens"),
                  ("cache_creation_tokens", "gen_ai.usage.cache_creation.input_tokens"),
                  ("reasoning_tokens", "rlm.usage.reasoning_tokens"))


def _token_details(usage: Mapping[str, Any]) -> dict[str, int]:
    """The non-zero prompt-cache and reasoning counts of a turn's usage, as attributes."""
    details = {}
    for name, attribute in _TOKEN_DETAILS:
        count = int(_number(usage.get(name)) or 0)
        if count:
            details[attribute] = count
    return details


def _usage_totals(usage: Any) -> tuple[int, int, float | None]:
    """(input tokens, output tokens, USD or None when unpriced) of a run_end's usage."""
    tokens_in = tokens_out = 0
    cost: float | None = 0.0
    for part in usage.values() if isinstance(usage, Mapping) else ():
        if not isinstance(part, Mapping):
            continue
        tokens_in += int(_number(part.get("prompt_tokens")) or 0)
        tokens_out += int(_number(part.get("completion_tokens")) or 0)
        if part.get("unpriced_models"):
            cost = None
        elif cost is not None:
            cost += _number(part.get("cost_usd")) or 0.0
    return tokens_in, tokens_out, cost


def _usage_by_model(usage: Any) -> dict[str, list[Any]]:
    """A run_end's usage per model: [calls, input tokens, output tokens, USD or None]."""
    rows: dict[str, list[Any]] = {}
    for part in usage.values() if isinstance(usage, Mapping) else ():
        models = part.get("by_model") if isinstance(part, Mapping) else None
        for model, mu in models.items() if isinstance(models, Mapping) else ():
            if not isinstance(mu, Mapping):
                continue
            row = rows.setdefault(str(model), [0, 0, 0, 0.0])
            row[0] += int(_number(mu.get("calls")) or 0)
            row[1] += int(_number(mu.get("prompt_tokens")) or 0)
            row[2] += int(_number(mu.get("completion_tokens")) or 0)
            priced = mu.get("priced", True)
            row[3] = None if not priced or row[3] is None else row[3] + (_number(mu.get("cost_usd")) or 0.0)
    return rows


class SpanBuilder:
    """Turns a trajectory's events, fed in order, into spans written to ``writer``.

    Events of child runs (forwarded with ``child_run``) nest under the cell that started
    them. ``origin`` is the Unix time of ``t`` = 0 when the log does not say it (logs
    written before ``run_start`` carried ``started_at``). ``content`` puts prompts,
    replies, code and outputs on the spans (default: the GenAI capture switch).
    ``finish`` closes what a log that ends early left open, at its last event.
    """

    def __init__(self, writer: SpanWriter, *, content: bool | None = None,
                 origin: float | None = None) -> None:
        self.writer = writer
        self.content = capture_content() if content is None else content
        self._origin = origin
        self._runs: dict[str, _Run] = {}
        self._subcall_spans = 0
        self._last_t = 0.0

    # -- times and spans -----------------------------------------------------------

    def _ns(self, t: float) -> int:
        return round(((self._origin or 0.0) + t) * 1e9)

    def _start(self, name: str, kind: str, t: float, parent: Any,
               attributes: Mapping[str, Any]) -> Any:
        return self.writer.start(name, kind, self._ns(t), parent,
                                 {k: v for k, v in attributes.items() if v is not None})

    def _end(self, span: Any, t: float, attributes: Mapping[str, Any] | None = None,
             error: str | None = None, message: str | None = None) -> None:
        self.writer.end(span, self._ns(t), {k: v for k, v in (attributes or {}).items()
                                            if v is not None}, error, message)

    def _chat_attributes(self, run: _Run, model: str, response_model: str,
                         tokens_in: int, tokens_out: int, usd: float | None) -> dict[str, Any]:
        return {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": provider_name(model),
            "gen_ai.request.model": _request_model(model),
            "gen_ai.response.model": _request_model(response_model) if response_model else None,
            "gen_ai.usage.input_tokens": tokens_in,
            "gen_ai.usage.output_tokens": tokens_out,
            "rlm.cost_usd": None if usd is None else round(usd, 10),
            "rlm.depth": run.depth,
        }

    # -- events ----------------------------------------------------------------------

    def feed(self, event: Event) -> None:
        """Take the next event of the trajectory."""
        kind = event.get("type")
        t = _number(event.get("t"))
        if kind is None or t is None:
            return
        self._last_t = max(self._last_t, t)
        key = str(event.get("child_run") or event.get("run_id") or "")
        if kind == "run_start":
            self._run_start(key, t, event)
            return
        run = self._runs.get(key)
        if run is None or run.ended:
            return
        if kind == "run_end":
            self._run_end(run, t, event)
        elif not run.traced:
            return
        elif kind == "root_request":
            self._root_request(run, t, event)
        elif kind == "root_reply":
            self._root_reply(run, t, event)
        elif kind == "compaction":
            self._compaction(run, t, event)
        elif kind == "cell":
            self._close_cell(run, t, "the cell was replaced")
            index, iteration = event.get("index"), event.get("iteration")
            attributes = {
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": "repl",
                "gen_ai.tool.type": "function",
                "gen_ai.tool.call.id": f"{key}:{iteration}.{index}",
                "rlm.iteration": iteration,
                "rlm.cell": index,
                "rlm.depth": run.depth,
            }
            if self.content:
                attributes["gen_ai.tool.call.arguments"] = json.dumps(
                    {"code": _capped(event.get("code") or "")}, ensure_ascii=False)
            run.cell = _Cell(self._start("execute_tool repl", "internal", t, run.span, attributes), t)
        elif kind == "sub_queries":
            self._sub_queries(run, event)
        elif kind == "cell_result":
            self._cell_result(run, t, event)
        elif kind in ("error", "budget", "interrupted"):
            run.problem = str(event.get("message") or event.get("reason") or kind)

    def _run_start(self, key: str, t: float, event: Event) -> None:
        if self._origin is None:
            started = _number(event.get("started_at"))
            if started is not None:
                self._origin = started - t
        depth = int(_number(event.get("depth")) or 0)
        parent = self._runs.get(str(event.get("parent_run") or "")) if depth else None
        if depth and parent is None:
            # Logs from before runs named their parent: the run one level up that has
            # a cell open (the one that started it).
            parent = next((r for r in reversed(self._runs.values())
                           if r.depth == depth - 1 and r.cell is not None and not r.ended), None)
        run = _Run(key, depth, t, traced=True, parent=parent,
                   model=str(event.get("model") or ""),
                   recursive_model=str(event.get("recursive_model") or event.get("model") or ""))
        self._runs[key] = run
        if parent is not None:
            if not parent.traced:
                run.traced = False  # summed with its ancestor, which counts its usage
                return
            cell = parent.cell
            if not self._may_span(cell):
                run.traced = False
                run.summary_cell = cell
                return
            if cell is not None:
                cell.spans += 1
            self._subcall_spans += 1
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": "rlm",
            "gen_ai.agent.id": key,
            "gen_ai.provider.name": provider_name(run.model),
            "gen_ai.request.model": _request_model(run.model),
            "rlm.recursive_model": run.recursive_model,
            "rlm.depth": depth,
            "rlm.max_depth": event.get("max_depth"),
            "rlm.sandbox": event.get("sandbox"),
        }
        if self.content:
            asked = event.get("prompt") if depth else event.get("query")
            attributes["gen_ai.input.messages"] = _text_message("user", asked or event.get("query") or "")
        host = parent.cell.span if parent is not None and parent.cell is not None else (
            parent.span if parent is not None else None)
        run.span = self._start("invoke_agent rlm", "internal", t, host, attributes)

    def _may_span(self, cell: _Cell | None) -> bool:
        if self._subcall_spans >= TRACE_SUBCALL_SPANS:
            return False
        return cell is None or cell.spans < SUBCALL_SPANS_PER_CELL

    def _root_request(self, run: _Run, t: float, event: Event) -> None:
        if run.turn is not None:
            self._end(run.turn, t, error="_OTHER", message="no reply")
        # Usage and the answering model come with the reply (``_root_reply``).
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": provider_name(run.model),
            "gen_ai.request.model": _request_model(run.model),
            "rlm.depth": run.depth,
            "rlm.iteration": event.get("iteration"),
        }
        if self.content:
            system, messages = _messages(event.get("messages"))
            if system:
                attributes["gen_ai.system_instructions"] = json.dumps(system, ensure_ascii=False)
            attributes["gen_ai.input.messages"] = json.dumps(messages, ensure_ascii=False)
        run.turn = self._start(f"chat {_request_model(run.model)}", "client", t, run.span, attributes)

    def _root_reply(self, run: _Run, t: float, event: Event) -> None:
        if run.turn is None:
            return
        usage = event.get("usage") if isinstance(event.get("usage"), Mapping) else {}
        attributes = self._chat_attributes(
            run, run.model, str(event.get("model") or run.model),
            int(_number(usage.get("prompt_tokens")) or 0),
            int(_number(usage.get("completion_tokens")) or 0), _number(usage.get("cost_usd")))
        attributes["rlm.cached"] = bool(event.get("cached"))
        attributes.update(_token_details(usage))
        if self.content:
            attributes["gen_ai.output.messages"] = _text_message("assistant", event.get("content") or "")
        self._end(run.turn, t, attributes)
        run.turn = None

    def _compaction(self, run: _Run, t: float, event: Event) -> None:
        usage = event.get("usage") if isinstance(event.get("usage"), Mapping) else {}
        attributes = self._chat_attributes(
            run, run.model, str(event.get("model") or run.model),
            int(_number(usage.get("prompt_tokens")) or 0),
            int(_number(usage.get("completion_tokens")) or 0), _number(usage.get("cost_usd")))
        attributes["rlm.operation"] = "compaction"
        attributes["rlm.iteration"] = event.get("iteration")
        attributes.update(_token_details(usage))
        if self.content:
            attributes["gen_ai.output.messages"] = _text_message("assistant", event.get("summary") or "")
        start = _number(event.get("t0"))
        span = self._start(f"chat {_request_model(run.model)}", "client",
                           t if start is None else start, run.span, attributes)
        self._end(span, t)

    def _sub_queries(self, run: _Run, event: Event) -> None:
        calls = read_sub_calls(event)
        if calls.child:
            return  # each was a child run: its own spans say what it did
        cell = run.cell
        recorded = event.get("calls") if isinstance(event.get("calls"), list) else []
        host = cell.span if cell is not None else run.span
        summary = cell.summary if cell is not None else _Summary()
        for item in calls.items:
            if self._may_span(cell):
                self._sub_call(run, item, host, recorded[item.index]
                               if item.index < len(recorded) else None)
                if cell is not None:
                    cell.spans += 1
                self._subcall_spans += 1
                continue
            summary.count += 1
            summary.failed += int(item.error is not None)
            summary.cached += int(item.cached)
            summary.span(item.start, item.end)
            summary.usage(item.model or run.recursive_model, 1, item.tokens_in, item.tokens_out,
                          item.usd)
        summary.count += max(0, calls.n - len(calls.items))
        summary.failed += calls.tail_failed
        summary.cached += calls.tail_cached
        for end in calls.tail_ends:
            summary.span(calls.t0, end)
        for model, row in calls.tail_models.items():
            usd = row.get("usd")
            summary.usage(model, int(_number(row.get("calls")) or 0),
                          int(_number(row.get("in")) or 0), int(_number(row.get("out")) or 0),
                          None if usd is None else _number(usd))
        if cell is None and summary.count:
            self._summary_spans(run, summary, run.span)

    def _sub_call(self, run: _Run, item: SubCall, host: Any, recorded: Any) -> None:
        model = run.recursive_model
        attributes = self._chat_attributes(run, model, item.model, item.tokens_in,
                                           item.tokens_out, item.usd)
        attributes["rlm.cached"] = item.cached
        attributes["rlm.subcall.index"] = item.index
        if item.error is not None:
            attributes["error.type"] = item.error
        if self.content and isinstance(recorded, Mapping):
            attributes["gen_ai.input.messages"] = _text_message("user", recorded.get("prompt") or "")
            attributes["gen_ai.output.messages"] = _text_message("assistant", recorded.get("reply") or "")
        span = self._start(f"chat {_request_model(model)}", "client", item.start, host, attributes)
        self._end(span, item.end, error=item.error,
                  message=(recorded.get("reply") if self.content and isinstance(recorded, Mapping)
                           else None) if item.error else None)

    def _summary_spans(self, run: _Run, summary: _Summary, host: Any) -> None:
        """One ``chat {model}`` span per model for sub-calls summed instead of spanned,
        so a backend's token and cost totals still hold every call."""
        start = summary.first if summary.first is not None else run.start
        end = summary.last if summary.last is not None else start
        for model, (calls, tokens_in, tokens_out, usd) in sorted(summary.models.items()):
            attributes = self._chat_attributes(run, model, model, tokens_in, tokens_out, usd)
            attributes["rlm.aggregate"] = True
            attributes["rlm.aggregate.calls"] = calls
            span = self._start(f"chat {_request_model(model)}", "client", start, host, attributes)
            self._end(span, end)

    def _summary_attributes(self, summary: _Summary) -> dict[str, Any]:
        if not summary.count:
            return {}
        attributes: dict[str, Any] = {
            "rlm.subcalls.summarised": summary.count,
            "rlm.subcalls.summarised_failed": summary.failed,
            "rlm.subcalls.summarised_cached": summary.cached,
            "rlm.subcalls.summarised_input_tokens": sum(r[1] for r in summary.models.values()),
            "rlm.subcalls.summarised_output_tokens": sum(r[2] for r in summary.models.values()),
        }
        if summary.durations:
            ordered = sorted(summary.durations)
            for name, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
                attributes[f"rlm.subcalls.latency_{name}_s"] = round(_percentile(ordered, p), 4)
            attributes["rlm.subcalls.latency_max_s"] = round(ordered[-1], 4)
        return attributes

    def _cell_result(self, run: _Run, t: float, event: Event) -> None:
        cell = run.cell
        if cell is None:
            return
        run.cell = None
        error = event.get("error")
        attributes: dict[str, Any] = {
            "rlm.duration_s": _number(event.get("duration_s")),
            "rlm.sub_calls": event.get("sub_calls"),
            "rlm.cached_sub_calls": event.get("cached_sub_calls"),
            "rlm.subcalls.spans": cell.spans,
            "rlm.final": event.get("final") is not None,
            **self._summary_attributes(cell.summary),
        }
        if self.content:
            attributes["gen_ai.tool.call.result"] = json.dumps(
                {name: _capped(event.get(name)) for name in ("stdout", "stderr", "error", "final")
                 if event.get(name) not in (None, "")}, ensure_ascii=False)
        error_type = None
        if isinstance(error, str) and error.strip():
            error_type = _error_type(error)
            attributes["error.type"] = error_type
        if cell.summary.count:
            self._summary_spans(run, cell.summary, cell.span)
        self._end(cell.span, t, attributes, error_type,
                  (error.strip().splitlines() or [""])[-1] if error_type and self.content else None)

    def _close_cell(self, run: _Run, t: float, why: str) -> None:
        cell = run.cell
        if cell is None:
            return
        run.cell = None
        if cell.summary.count:
            self._summary_spans(run, cell.summary, cell.span)
        self._end(cell.span, t, self._summary_attributes(cell.summary), "_OTHER", why)

    def _run_end(self, run: _Run, t: float, event: Event) -> None:
        run.ended = True
        usage = event.get("usage")
        if not run.traced:
            cell = run.summary_cell
            if cell is not None:
                cell.summary.count += 1
                cell.summary.failed += int(event.get("answer") is None)
                cell.summary.span(run.start, t)
                for model, (calls, tokens_in, tokens_out, usd) in _usage_by_model(usage).items():
                    cell.summary.usage(model, calls, tokens_in, tokens_out, usd)
            return
        if run.turn is not None:
            self._end(run.turn, t, error="_OTHER", message="the run ended before the reply")
            run.turn = None
        self._close_cell(run, t, "the run ended during the cell")
        tokens_in, tokens_out, cost = _usage_totals(usage)
        answer = event.get("answer")
        stopped = str(event.get("stopped_reason") or "")
        attributes: dict[str, Any] = {
            "rlm.stopped_reason": stopped,
            "rlm.iterations": event.get("iterations"),
            "rlm.sub_calls": event.get("sub_calls"),
            "rlm.usage.input_tokens": tokens_in,
            "rlm.usage.output_tokens": tokens_out,
            "rlm.cost_usd": cost,
        }
        if self.content and answer is not None:
            attributes["gen_ai.output.messages"] = _text_message("assistant", answer)
        error = None
        message = None
        if answer is None:
            error = stopped or "_OTHER"
            message = str(event.get("error") or run.problem or stopped)
        self._end(run.span, t, attributes, error, message)

    def finish(self) -> None:
        """Close every span still open (a log cut short), at the last event's time."""
        for run in reversed(list(self._runs.values())):
            if run.ended or not run.traced:
                continue
            run.ended = True
            t = self._last_t
            if run.turn is not None:
                self._end(run.turn, t, error="_OTHER", message="the log ends here")
            self._close_cell(run, t, "the log ends here")
            self._end(run.span, t, {"rlm.stopped_reason": "incomplete"}, "incomplete",
                      "the log ends before the run did")


class OTelWriter:
    """Writes spans through opentelemetry-api's global tracer provider; the first span
    of a trace is a child of whatever span was current when the writer was made."""

    def __init__(self) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self._trace = trace
        self._kinds = {"internal": SpanKind.INTERNAL, "client": SpanKind.CLIENT}
        self._status = Status
        self._error = StatusCode.ERROR
        self._tracer = trace.get_tracer("rlm", scope_version())
        self._context = context.get_current()

    def start(self, name: str, kind: str, start_ns: int, parent: Any,
              attributes: Mapping[str, Any]) -> Any:
        """Start a span at ``start_ns`` under ``parent`` (None: the caller's context)."""
        ctx = self._trace.set_span_in_context(parent) if parent is not None else self._context
        return self._tracer.start_span(name, context=ctx, kind=self._kinds[kind],
                                       attributes=dict(attributes), start_time=start_ns)

    def end(self, span: Any, end_ns: int, attributes: Mapping[str, Any],
            error: str | None = None, message: str | None = None) -> None:
        """Set the last attributes and the error (if any), and end the span at ``end_ns``."""
        if attributes:
            span.set_attributes(dict(attributes))
        if error is not None:
            span.set_attribute("error.type", error)
            span.set_status(self._status(self._error, message))
        span.end(end_time=end_ns)


def trace_sink() -> Callable[[Event], None]:
    """A trajectory sink that sends a run's spans through opentelemetry-api as its events
    happen (tracing must be wanted: ``tracing_wanted``). Spans carry message content
    only when the GenAI capture switch is on."""
    import threading

    builder = SpanBuilder(OTelWriter())
    lock = threading.Lock()

    def sink(event: Event) -> None:
        with lock:
            builder.feed(event)

    return sink


def replay(events: Iterable[Event], *, content: bool | None = None) -> None:
    """Send a recorded trajectory's spans (``read_log``'s events) through
    opentelemetry-api now, with their recorded times: the same spans the run would
    have sent live, to whatever exporter the program's SDK has (for backends that take
    protobuf only, where ``rlm view --otlp``'s JSON does not go). ``content`` as in
    ``SpanBuilder``; the program flushes its SDK (``force_flush``) when it wants them sent."""
    builder = SpanBuilder(OTelWriter(), content=content)
    for event in events:
        if isinstance(event, Mapping):
            builder.feed(event)
    builder.finish()


def configure_sdk() -> Callable[[], None] | None:
    """For ``rlm run --trace``: when no OpenTelemetry SDK is set up yet (no
    ``opentelemetry-instrument``, no provider set by the program), set one up that
    sends spans over OTLP/HTTP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or its traces
    variant) is set and the exporter is installed, else prints them to stderr. Returns
    the function that flushes and shuts it down (None when a provider was already set).
    Raises ``ConfigError`` when the SDK is not installed."""
    from opentelemetry import trace

    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return None
    if importlib.util.find_spec("opentelemetry.sdk") is None:
        raise ConfigError(
            "--trace needs an OpenTelemetry SDK to send spans: pip install opentelemetry-sdk "
            "(and opentelemetry-exporter-otlp-proto-http for a backend), or run under "
            "opentelemetry-instrument"
        )
    import sys

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get(
        "OTEL_SERVICE_NAME", "rlm")}))
    endpoint = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    if endpoint and importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is not None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif endpoint:
        raise ConfigError(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter is not installed: "
            "pip install opentelemetry-exporter-otlp-proto-http"
        )
    else:
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    trace.set_tracer_provider(provider)
    return provider.shutdown
