"""Faults: the failures the fake server plays instead of a normal answer.

Holds the :class:`Fault` value and the set of fault kinds, with their validation. It
must not hold how a fault is rendered on the wire: each protocol module (OpenAI,
Anthropic) renders faults in its own provider's shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field

__all__ = ["FAULT_KINDS", "Fault"]

FAULT_KINDS = frozenset(
    {
        "429",
        "500",
        "503",
        "529",
        "hang",
        "drop",
        "malformed",
        "context_length",
        "cut",
        "no_usage",
        "detail",
        "stream_error",
    }
)

# Kinds whose reply still carries the responder's answer, only shaped wrongly.
ANSWERING_KINDS = frozenset({"cut", "no_usage", "stream_error"})
_RETRY_AFTER_KINDS = frozenset({"429", "503", "529"})


@dataclass(frozen=True)
class Fault:
    """A failure the server plays instead of a normal answer: return one from a responder or a
    script item, or queue one with :meth:`FakeLLMServer.inject`.

    ``kind`` is one of:

    - ``"429"``: a rate-limit error (``rate_limit_exceeded`` / ``rate_limit_error``), with
      ``Retry-After`` in seconds and/or ``retry-after-ms`` when given;
    - ``"500"``, ``"503"``: a server error in the provider's error body (``503`` may carry
      ``retry_after``);
    - ``"529"``: Anthropic's ``overloaded_error`` (also on the OpenAI routes, as status 529);
    - ``"hang"``: never answer; the connection stays open until the client gives up or the
      server stops;
    - ``"drop"``: close the connection without a byte;
    - ``"malformed"``: status 200 whose body (or a stream's data line) is not valid JSON;
    - ``"context_length"``: a 400 for a prompt longer than the model's window
      (``context_length_exceeded``; Anthropic's "prompt is too long");
    - ``"cut"``: a stream that ends after its first content chunk, with no finish reason and
      no ``[DONE]`` (``message_stop`` on Anthropic); without streaming, a body cut short
      of its Content-Length;
    - ``"no_usage"``: a normal answer without any ``usage``;
    - ``"detail"``: an error whose body is not the provider's shape but FastAPI's
      ``{"detail": message}``, with ``status`` (default 400);
    - ``"stream_error"``: a 200 stream whose first chunk is followed by an error event:
      a rate-limit error by default, ``status=529`` an overload, ``status=500`` a server
      error (without streaming: a 200 whose JSON body is that error).

    ``headers`` are sent with the fault's reply whatever its kind (for example
    ``{"llm_provider-retry-after": "0.2"}`` as a proxy forwards an upstream's wait, or
    ``{"retry-after": "90"}``); ``message`` replaces the default error message (for an
    answering kind that a responder returns, it is the text of the answer).
    """

    kind: str
    _: KW_ONLY
    retry_after: float | None = None
    retry_after_ms: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    status: int | None = None
    message: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(
                f"unknown fault kind {self.kind!r}; use one of {', '.join(sorted(FAULT_KINDS))}"
            )
        if self.kind not in _RETRY_AFTER_KINDS and (
            self.retry_after is not None or self.retry_after_ms is not None
        ):
            raise ValueError(
                "retry_after and retry_after_ms only apply to Fault('429'/'503'/'529'); "
                "use headers= for other kinds"
            )
        if self.retry_after is not None and self.retry_after < 0:
            raise ValueError("retry_after must be >= 0 seconds")
        if self.retry_after_ms is not None and self.retry_after_ms < 0:
            raise ValueError("retry_after_ms must be >= 0")
        if self.status is not None and self.kind not in ("detail", "stream_error"):
            raise ValueError("status only applies to Fault('detail') and Fault('stream_error')")
        if self.status is not None and not 100 <= self.status <= 599:
            raise ValueError("status must be an HTTP status code (100-599)")
        if self.headers and self.kind in ("hang", "drop"):
            raise ValueError(f"Fault({self.kind!r}) sends no reply, so it cannot carry headers")
        # A plain dict, copied, so a caller's later edits do not change a queued fault.
        object.__setattr__(self, "headers", {str(k): str(v) for k, v in self.headers.items()})

    @property
    def answers(self) -> bool:
        """Whether the reply still carries the model's answer (``cut``, ``no_usage``,
        ``stream_error``), so the responder runs for it."""
        return self.kind in ANSWERING_KINDS

    def retry_headers(self) -> dict[str, str]:
        """The Retry-After headers this fault asks for, then its extra ``headers``."""
        out: dict[str, str] = {}
        if self.retry_after is not None:
            value = float(self.retry_after)
            out["Retry-After"] = str(int(value)) if value.is_integer() else repr(value)
        if self.retry_after_ms is not None:
            out["retry-after-ms"] = str(self.retry_after_ms)
        out.update(self.headers)
        return out
