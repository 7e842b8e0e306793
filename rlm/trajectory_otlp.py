"""A trajectory as OTLP JSON: the spans of ``rlm.tracing`` written in the OpenTelemetry
protocol's JSON encoding, so a past run loads into any OTLP backend.

The document is ``{"resourceSpans": [{"resource", "scopeSpans": [{"scope", "spans"}]}]}``
with the protobuf-to-JSON mapping OTLP/HTTP uses: trace and span ids as lowercase hex,
times as decimal strings of Unix nanoseconds, enums as integers, attributes as
``{"key", "value": {"stringValue" | "intValue" | "doubleValue" | "boolValue"}}``.
Ids are derived from the run ids, so exporting a log twice gives the same trace. This
module needs no opentelemetry package; it must not hold the span model (``rlm.tracing``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rlm.tracing import SpanBuilder, scope_version
from rlm.trajectory import Event

__all__ = ["OTLPJsonWriter", "trajectory_otlp"]

# SpanKind and StatusCode of the OTLP protobuf.
_KINDS = {"internal": 1, "client": 3}
_STATUS_ERROR = 2


def _value(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}  # int64 is a decimal string in OTLP JSON
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, list | tuple):
        return {"arrayValue": {"values": [_value(v) for v in value]}}
    return {"stringValue": str(value)}


def _attributes(attributes: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"key": k, "value": _value(v)} for k, v in attributes.items()]


@dataclass
class _Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: str
    start_ns: int
    end_ns: int = 0
    attributes: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    message: str | None = None


class OTLPJsonWriter:
    """A ``SpanWriter`` that keeps spans and gives them as one OTLP JSON document."""

    def __init__(self, service_name: str = "rlm") -> None:
        self.service_name = service_name
        self._spans: list[_Span] = []
        self._traces = 0

    def _id(self, *parts: Any, size: int) -> str:
        return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:size]

    def start(self, name: str, kind: str, start_ns: int, parent: Any,
              attributes: Mapping[str, Any]) -> _Span:
        """Open a span under ``parent`` (None: the root of a new trace)."""
        if parent is None:
            self._traces += 1
            trace_id = self._id("trace", attributes.get("gen_ai.agent.id"), self._traces, size=32)
            parent_id = ""
        else:
            trace_id, parent_id = parent.trace_id, parent.span_id
        span = _Span(trace_id, self._id(trace_id, len(self._spans), size=16), parent_id,
                     name, kind, start_ns, start_ns, dict(attributes))
        self._spans.append(span)
        return span

    def end(self, span: _Span, end_ns: int, attributes: Mapping[str, Any],
            error: str | None = None, message: str | None = None) -> None:
        """Close ``span`` with its last attributes and its error, if any."""
        span.end_ns = max(end_ns, span.start_ns)
        span.attributes.update(attributes)
        if error is not None:
            span.attributes["error.type"] = error
            span.error, span.message = error, message

    def document(self) -> dict[str, Any]:
        """Every span written so far, as one OTLP JSON ``ExportTraceServiceRequest``."""
        spans = []
        for s in self._spans:
            span: dict[str, Any] = {
                "traceId": s.trace_id,
                "spanId": s.span_id,
                "name": s.name,
                "kind": _KINDS[s.kind],
                "startTimeUnixNano": str(s.start_ns),
                "endTimeUnixNano": str(s.end_ns),
                "attributes": _attributes(s.attributes),
                "status": {"code": _STATUS_ERROR, "message": s.message or ""}
                if s.error is not None else {},
            }
            if s.parent_id:
                span["parentSpanId"] = s.parent_id
            spans.append(span)
        return {"resourceSpans": [{
            "resource": {"attributes": _attributes({"service.name": self.service_name})},
            "scopeSpans": [{"scope": {"name": "rlm", "version": scope_version() or ""},
                            "spans": spans}],
        }]}


def trajectory_otlp(events: Iterable[Event], *, content: bool | None = None,
                    service_name: str = "rlm", origin: float | None = None) -> dict[str, Any]:
    """The spans of a trajectory (``read_log``'s events) as one OTLP JSON document, the
    same spans a traced run sends live; POST it to a backend's ``/v1/traces`` with
    ``Content-Type: application/json``. ``content`` puts prompts, replies, code and
    outputs on the spans (default: the GenAI capture switch,
    ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``). ``origin`` is the Unix
    time of the run's start for logs too old to say it."""
    writer = OTLPJsonWriter(service_name)
    builder = SpanBuilder(writer, content=content, origin=origin)
    for event in events:
        if isinstance(event, Mapping):
            builder.feed(event)
    builder.finish()
    return writer.document()
