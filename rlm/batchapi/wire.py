"""The providers' Batch API endpoints: OpenAI's Files and Batches, Anthropic's Message Batches.

A ``BatchWire`` turns one list of requests into one provider batch and back: it writes
the request lines, submits them, reads the batch's status, downloads its result lines
and cancels it, in one provider's protocol. What goes inside a line is the provider
adapter's business (``rlm.providers``): a line carries exactly the body the adapter
would POST live, and the body of a result line is parsed by the adapter as a live reply
would be. So a provider with a batch endpoint fits by adding a wire here and a line to
``WIRES``: OpenAI-compatible (``openai``) and Anthropic (``anthropic``, for the native
adapter: its lines are ``{"custom_id", "params": <the Messages body>}``).

This module must not hold grouping into files, polling schedules, retries, fallbacks
or crash state (``rlm.batchapi.collector``, ``rlm.batchapi.journal``).
"""

from __future__ import annotations

import abc
import asyncio
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from rlm.errors import ConfigError, LLMConnectionError, LLMError, LLMTimeoutError
from rlm.providers import Adapter, Request

__all__ = ["WIRES", "BatchStatus", "BatchWire", "LineOutcome", "wire_for"]

# Statuses worth asking again for a control call (upload, create, poll, download).
_TRANSIENT = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
_CONTROL_TRIES = 6
# Request-line HTTP statuses of the Anthropic error types (their batch results carry
# the type only).
_ANTHROPIC_STATUS = {
    "invalid_request_error": 400, "authentication_error": 401, "permission_error": 403,
    "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429,
    "api_error": 500, "overloaded_error": 529,
}  # fmt: skip


@dataclass(frozen=True)
class BatchStatus:
    """What the provider says of one batch.

    ``state`` is "running", "ended" (its lines have results: ``how`` says "completed",
    "expired" or "cancelled") or "failed" (rejected as a whole; ``error`` says why).
    ``done``/``failed``/``total`` count lines; ``where`` is what ``results`` reads.
    """

    id: str
    state: str
    how: str | None = None
    done: int = 0
    failed: int = 0
    total: int = 0
    error: str | None = None
    where: tuple[str | None, ...] = ()


@dataclass(frozen=True)
class LineOutcome:
    """The result of one line: ``kind`` "ok" (``body`` is the reply), "error" (``status``
    and the error ``body``), or "expired"/"cancelled" (the line never ran)."""

    custom_id: str
    kind: str
    status: int | None = None
    body: Any = None


def _probe(model: str = "batch-probe") -> Request:
    return Request({"model": model, "messages": [{"role": "user", "content": "probe"}],
                    "max_tokens": 1})


class BatchWire(abc.ABC):
    """One provider's Batch API for one endpoint and key (the adapter's).

    Subclasses give the limits and the five calls; this base class holds the HTTP
    session (its own, opened on first use on the running loop) and retries the control
    calls after transient failures, honouring the wait a server asks for.
    """

    #: At most this many requests and bytes in one batch.
    max_lines: ClassVar[int]
    max_bytes: ClassVar[int]

    def __init__(self, adapter: Adapter, *, timeout: float = 300.0) -> None:
        self.adapter = adapter
        self.timeout = timeout
        probe = adapter.build(_probe())
        self.live_url = probe.url
        # The adapter's own authentication and version headers, without the body's type.
        self.headers = {k: v for k, v in probe.headers.items()
                        if k.lower() not in ("content-type", "accept", "content-length")}
        self._session: Any = None

    # -- what a provider defines ------------------------------------------------------

    @abc.abstractmethod
    def line(self, custom_id: str, request: Request) -> bytes:
        """One request line of a batch (no newline)."""

    @abc.abstractmethod
    async def submit(self, lines: list[bytes], token: str) -> str:
        """Create a batch of ``lines``; ``token`` names the submission (``find``). Returns
        the batch id."""

    @abc.abstractmethod
    async def status(self, batch_id: str) -> BatchStatus:
        """The batch's state and counts now."""

    @abc.abstractmethod
    async def results(self, status: BatchStatus) -> list[LineOutcome]:
        """Every line of an ended batch with what became of it."""

    @abc.abstractmethod
    async def cancel(self, batch_id: str) -> None:
        """Ask the provider to stop the batch (lines already answered stay answered)."""

    async def find(self, token: str) -> str | None:
        """The id of the batch submitted under ``token``, if the provider can tell (a
        submission interrupted between its create and its record); None otherwise."""
        return None

    # -- HTTP -------------------------------------------------------------------------

    def _ensure_session(self) -> Any:
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def call(self, method: str, url: str, *, body: bytes | None = None,
                   form: Mapping[str, Any] | None = None, json_type: bool = True) -> Any:
        """One control call, retried after transient failures; returns the decoded JSON
        body (or the raw bytes for a download: ``json_type=False``)."""
        import aiohttp

        session = self._ensure_session()
        headers = dict(self.headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        attempt = 0
        while True:
            attempt += 1
            data: Any = body
            if form is not None:
                data = aiohttp.FormData()
                for name, value in form.items():
                    if isinstance(value, tuple):
                        filename, content, kind = value
                        data.add_field(name, content, filename=filename, content_type=kind)
                    else:
                        data.add_field(name, value)
            wait: float | None = None
            try:
                async with session.request(method, url, data=data, headers=headers) as resp:
                    raw = await resp.read()
                    if resp.status == 200:
                        return json.loads(raw) if json_type else raw
                    error = self.adapter.parse_error(resp.status, resp.headers, raw)
                    if resp.status not in _TRANSIENT or attempt >= _CONTROL_TRIES:
                        raise error
                    wait = error.retry_after
            except (TimeoutError, aiohttp.ClientError) as exc:
                if attempt >= _CONTROL_TRIES:
                    if isinstance(exc, TimeoutError):
                        raise LLMTimeoutError(f"{method} {url}: no answer within "
                                              f"{self.timeout:g} s") from exc
                    raise LLMConnectionError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
            if wait is None or wait > 60:
                wait = min(30.0, 0.5 * 2 ** (attempt - 1)) * random.uniform(0.75, 1.25)
            await asyncio.sleep(wait)

    async def close(self) -> None:
        """Close the HTTP session."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class OpenAIBatchWire(BatchWire):
    """OpenAI's Batch API: a JSONL file uploaded to ``/files`` (purpose ``batch``), a
    batch made of it at ``/batches`` for ``/v1/chat/completions``, results in an output
    file and an error file. Submissions carry ``metadata.rlm_submission`` so an
    interrupted one is found again."""

    max_lines = 50_000
    max_bytes = 200 * 1024 * 1024
    endpoint = "/v1/chat/completions"

    def __init__(self, adapter: Adapter, *, timeout: float = 300.0) -> None:
        super().__init__(adapter, timeout=timeout)
        root = self.live_url.removesuffix("/chat/completions")
        self.files_url = root + "/files"
        self.batches_url = root + "/batches"

    def line(self, custom_id: str, request: Request) -> bytes:
        body = self.adapter.build(request).body
        return (b'{"custom_id":' + json.dumps(custom_id).encode()
                + b',"method":"POST","url":"' + self.endpoint.encode() + b'","body":' + body
                + b"}")

    async def submit(self, lines: list[bytes], token: str) -> str:
        data = b"\n".join(lines) + b"\n"
        upload = await self.call("POST", self.files_url, form={
            "purpose": "batch", "file": (f"{token}.jsonl", data, "application/jsonl")})
        created = await self.call("POST", self.batches_url, body=json.dumps({
            "input_file_id": upload["id"], "endpoint": self.endpoint,
            "completion_window": "24h", "metadata": {"rlm_submission": token},
        }).encode())
        return str(created["id"])

    async def status(self, batch_id: str) -> BatchStatus:
        card = await self.call("GET", f"{self.batches_url}/{batch_id}")
        state = card.get("status")
        counts = card.get("request_counts") or {}
        common = dict(done=int(counts.get("completed") or 0), failed=int(counts.get("failed") or 0),
                      total=int(counts.get("total") or 0))
        if state in ("completed", "expired", "cancelled"):
            return BatchStatus(batch_id, "ended", state, **common,
                               where=(card.get("output_file_id"), card.get("error_file_id")))
        if state == "failed":
            errors = ((card.get("errors") or {}).get("data") or [])
            first = errors[0] if errors else {}
            text = first.get("message") or "the provider rejected the batch"
            if first.get("line"):
                text += f" (line {first['line']})"
            return BatchStatus(batch_id, "failed", error=text, **common)
        return BatchStatus(batch_id, "running", **common)

    async def results(self, status: BatchStatus) -> list[LineOutcome]:
        out: list[LineOutcome] = []
        for file_id in status.where:
            if not file_id:
                continue
            raw = await self.call("GET", f"{self.files_url}/{file_id}/content", json_type=False)
            for text in raw.splitlines():
                if not text.strip():
                    continue
                item = json.loads(text)
                out.append(self._outcome(item))
        return out

    @staticmethod
    def _outcome(item: Mapping[str, Any]) -> LineOutcome:
        custom_id = str(item.get("custom_id"))
        response = item.get("response")
        if isinstance(response, Mapping):
            code = int(response.get("status_code") or 0)
            return LineOutcome(custom_id, "ok" if code == 200 else "error", code,
                               response.get("body"))
        error = item.get("error") or {}
        code_name = str(error.get("code") or "")
        if code_name == "batch_expired":
            return LineOutcome(custom_id, "expired", None, error)
        if code_name == "batch_cancelled":
            return LineOutcome(custom_id, "cancelled", None, error)
        return LineOutcome(custom_id, "error", None, {"error": error})

    async def cancel(self, batch_id: str) -> None:
        await self.call("POST", f"{self.batches_url}/{batch_id}/cancel", body=b"{}")

    async def find(self, token: str) -> str | None:
        after: str | None = None
        for _ in range(20):  # the 2,000 most recent batches
            url = f"{self.batches_url}?limit=100" + (f"&after={after}" if after else "")
            page = await self.call("GET", url)
            for card in page.get("data") or ():
                if (card.get("metadata") or {}).get("rlm_submission") == token:
                    return str(card["id"])
            if not page.get("has_more") or not page.get("data"):
                return None
            after = page["data"][-1]["id"]
        return None


class AnthropicBatchWire(BatchWire):
    """Anthropic's Message Batches: one JSON ``{"requests": [...]}`` POST to
    ``/messages/batches``, polled until ``processing_status`` is ``ended``, results as
    JSONL at the batch's ``results_url``. Lines are ``{"custom_id", "params"}`` with
    ``params`` the body the Anthropic adapter builds for ``/messages``."""

    max_lines = 100_000
    max_bytes = 256 * 1024 * 1024

    def __init__(self, adapter: Adapter, *, timeout: float = 300.0) -> None:
        super().__init__(adapter, timeout=timeout)
        self.batches_url = self.live_url.rstrip("/") + "/batches"

    def line(self, custom_id: str, request: Request) -> bytes:
        body = self.adapter.build(request).body
        return b'{"custom_id":' + json.dumps(custom_id).encode() + b',"params":' + body + b"}"

    async def submit(self, lines: list[bytes], token: str) -> str:
        created = await self.call("POST", self.batches_url,
                                  body=b'{"requests":[' + b",".join(lines) + b"]}")
        return str(created["id"])

    async def status(self, batch_id: str) -> BatchStatus:
        card = await self.call("GET", f"{self.batches_url}/{batch_id}")
        counts = card.get("request_counts") or {}
        done = int(counts.get("succeeded") or 0)
        failed = sum(int(counts.get(k) or 0) for k in ("errored", "canceled", "expired"))
        total = done + failed + int(counts.get("processing") or 0)
        if card.get("processing_status") != "ended":
            return BatchStatus(batch_id, "running", done=done, failed=failed, total=total)
        how = "completed"
        if card.get("cancel_initiated_at") and counts.get("canceled"):
            how = "cancelled"
        elif counts.get("expired"):
            how = "expired"
        return BatchStatus(batch_id, "ended", how, done, failed, total,
                           where=(card.get("results_url"),))

    async def results(self, status: BatchStatus) -> list[LineOutcome]:
        url = status.where[0] if status.where else None
        if not url:
            return []
        raw = await self.call("GET", url, json_type=False)
        out = []
        for text in raw.splitlines():
            if not text.strip():
                continue
            item = json.loads(text)
            custom_id = str(item.get("custom_id"))
            result = item.get("result") or {}
            kind = result.get("type")
            if kind == "succeeded":
                out.append(LineOutcome(custom_id, "ok", 200, result.get("message")))
            elif kind == "errored":
                error = result.get("error") or {}
                inner = error.get("error") if isinstance(error.get("error"), Mapping) else error
                status_code = _ANTHROPIC_STATUS.get(str(inner.get("type")), 500)
                out.append(LineOutcome(custom_id, "error", status_code, error))
            elif kind == "expired":
                out.append(LineOutcome(custom_id, "expired"))
            else:
                out.append(LineOutcome(custom_id, "cancelled"))
        return out

    async def cancel(self, batch_id: str) -> None:
        await self.call("POST", f"{self.batches_url}/{batch_id}/cancel", body=b"{}")


# Provider name (the adapter's ``name``) -> its Batch API.
WIRES: dict[str, type[BatchWire]] = {
    "openai": OpenAIBatchWire,
    "anthropic": AnthropicBatchWire,
}


def wire_for(adapter: Adapter) -> BatchWire:
    """The Batch API of ``adapter``'s provider; ``ConfigError`` if it has none here."""
    cls = WIRES.get(adapter.name)
    if cls is None:
        raise ConfigError(
            f"the {adapter.name!r} provider has no Batch API in rlm; use batch_api=False "
            f"(providers with one: {', '.join(sorted(WIRES))})"
        )
    return cls(adapter)


def line_error(adapter: Adapter, outcome: LineOutcome) -> LLMError:
    """The error of a failed line, typed and worded as the same failure live would be."""
    raw = json.dumps(outcome.body if outcome.body is not None else {}).encode()
    return adapter.parse_error(outcome.status or 500, {}, raw)
