"""The providers' Batch APIs: OpenAI's Files and Batches, and Anthropic's Message Batches.

Holds :class:`BatchOptions` (how long a batch takes, the share of lines that fail, when
it expires), the file store, both batch lifecycles and their routes. A batch's lines
are answered by the same model (responders, scripts, prompt cache) as live requests,
without latency, queued faults or rate limits, and count in the stats apart from live
requests (``batch_lines`` per model, ``batches_created``, ``files_created``). A batch
advances with the clock: it is in progress until ``delay`` seconds after creation and
is settled by the first request that looks at it after that, so a test never waits on
a background task. It must not hold the chat pipeline or a protocol's single-request
shapes (it reuses ``openai_api`` and ``anthropic_api`` for those).
"""

from __future__ import annotations

import datetime
import itertools
import json
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from rlm.testing import anthropic_api, openai_api
from rlm.testing.faults import Fault
from rlm.testing.hub import Hub
from rlm.testing.model import Answer, ChatCall, Refusal
from rlm.testing.wire import Payload, json_payload, respond

__all__ = ["BatchOptions", "add_routes"]

MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_OPENAI_REQUESTS = 50_000
MAX_ANTHROPIC_REQUESTS = 100_000
MAX_ANTHROPIC_BYTES = 256 * 1024 * 1024
SUPPORTED_ENDPOINT = "/v1/chat/completions"
_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_ENC = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


@dataclass(frozen=True)
class BatchOptions:
    """How the fake's batches behave: a batch completes ``delay`` seconds after it is
    created; a random ``failure_rate`` share of its lines fail (a 500 line in the error
    file, an ``errored`` result on Anthropic); with ``expire_after`` (seconds, the fake's
    24 h window) shorter than ``delay`` it expires instead, the lines done by then (a
    share proportional to the time elapsed) in the output and the rest as
    ``batch_expired`` (``expired`` on Anthropic); ``seed`` makes failures and the
    shuffled output order repeatable."""

    delay: float = 0.0
    failure_rate: float = 0.0
    expire_after: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.delay < 0:
            raise ValueError("batch delay must be >= 0 seconds")
        if not 0 <= self.failure_rate <= 1:
            raise ValueError("batch failure_rate must be in [0, 1]")
        if self.expire_after is not None and self.expire_after < 0:
            raise ValueError("batch expire_after must be >= 0 seconds")


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def card(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }


@dataclass
class _Batch:
    """One batch of either protocol: its lines (custom_id and decoded body), its clock and,
    once settled, what became of each line."""

    id: str
    protocol: str
    lines: list[tuple[str, Any]]
    created_wall: float
    created_mono: float
    info: dict[str, Any] = field(default_factory=dict)
    state: str = "in_progress"  # in_progress, cancelling, failed, or a final state
    cancel_mono: float | None = None
    cancel_wall: float | None = None
    ended_wall: float | None = None
    # Settled lines: custom_id -> ("ok", body) | ("error", status, body) | ("expired",) ...
    results: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None
    usage: dict[str, int] = field(default_factory=dict)


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    when = datetime.datetime.fromtimestamp(wall, datetime.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class BatchStore:
    """Files and batches of one fake server, and how a batch is answered."""

    def __init__(self, hub: Hub, options: BatchOptions, root_url: Any) -> None:
        self.hub = hub
        self.options = options
        self._root_url = root_url
        self.files: dict[str, _File] = {}
        self.batches: dict[str, _Batch] = {}
        self._ids = itertools.count(1)
        self._rng = random.Random(options.seed)
        self._lock = threading.RLock()
        self.openai_wire = openai_api.OpenAIWire(hub.ids.__next__, hub.cache)
        self.anthropic_wire = anthropic_api.AnthropicWire(hub.ids.__next__, hub.cache)

    def new_id(self, prefix: str) -> str:
        """A fresh id with ``prefix``."""
        return f"{prefix}{next(self._ids):06d}fake"

    def add_file(self, filename: str, purpose: str, data: bytes) -> _File:
        """Store a file and count it."""
        stored = _File(self.new_id("file-"), filename, purpose, data, int(time.time()))
        with self._lock:
            self.files[stored.id] = stored
        self.hub.count("files_created")
        return stored

    # -- one line ---------------------------------------------------------------------

    def _answer(self, call: ChatCall) -> Answer | Fault | Refusal:
        result = self.hub.model.answer(call)
        if isinstance(result, Fault) and result.answers:
            result = self.hub.model.settle(call, result.message or "")
        return result

    def _fails(self) -> bool:
        rate = self.options.failure_rate
        return rate > 0 and self._rng.random() < rate

    def _line(
        self,
        call: ChatCall | Payload,
        wire: openai_api.OpenAIWire | anthropic_api.AnthropicWire,
        failure: dict[str, Any],
        refused: Callable[[Refusal], dict[str, Any]],
    ) -> tuple[Any, ...]:
        # What one line becomes: ("ok", reply body) or ("error", status, error body);
        # ``failure`` is the error body of a simulated line failure.
        if isinstance(call, Payload):
            return ("error", call.status, json.loads(call.body))
        if self._fails():
            return ("error", 500, failure)
        result = self._answer(call)
        if isinstance(result, Refusal):
            return ("error", result.status, refused(result))
        if isinstance(result, Fault):
            payload = wire.fault(call, result)
            try:
                error = json.loads(payload.body)
            except ValueError:  # a hang, a drop or a malformed body: a failed line
                error = failure
            return ("error", payload.status if payload.action == "send" else 500, error)
        if isinstance(wire, openai_api.OpenAIWire):
            return ("ok", wire.completion(call, result))
        return ("ok", wire.message(call, result))

    def openai_line(self, body: dict[str, Any]) -> tuple[Any, ...]:
        """What one OpenAI batch line becomes."""
        return self._line(
            openai_api.chat_call(body, None),
            self.openai_wire,
            openai_api.error_body(
                "The server had an error processing this request (simulated batch line "
                "failure).", "server_error", "internal_error"),
            lambda r: openai_api.error_body(r.message, r.type, r.code, r.param),
        )

    def anthropic_line(self, params: Any) -> tuple[Any, ...]:
        """What one Anthropic batch request becomes."""
        return self._line(
            anthropic_api.messages_call(params),
            self.anthropic_wire,
            anthropic_api.error_body(500, "Internal server error (simulated batch line "
                                          "failure)."),
            lambda r: anthropic_api.error_body(r.status, r.message),
        )

    # -- the clock ---------------------------------------------------------------------

    def advance(self, batch: _Batch) -> None:
        """Settle ``batch`` if its time has come (completion, expiry or a cancel)."""
        with self._lock:
            if batch.state not in ("in_progress", "cancelling"):
                return
            now = time.monotonic()
            elapsed = now - batch.created_mono
            delay = self.options.delay
            expire = self.options.expire_after
            if batch.state == "cancelling":
                assert batch.cancel_mono is not None
                done = self._done_share(batch.cancel_mono - batch.created_mono)
                self._settle(batch, done, "cancelled")
            elif expire is not None and expire < delay and elapsed >= expire:
                self._settle(batch, self._done_share(expire), "expired")
            elif elapsed >= delay:
                self._settle(batch, 1.0, "completed")

    def _done_share(self, elapsed: float) -> float:
        delay = self.options.delay
        return 1.0 if delay <= 0 else min(1.0, max(0.0, elapsed / delay))

    def _settle(self, batch: _Batch, share: float, final: str) -> None:
        count = int(len(batch.lines) * share)
        order = list(range(len(batch.lines)))
        self._rng.shuffle(order)
        done = set(order[:count])
        missing = "expired" if final == "expired" else "cancelled"
        results: list[tuple[str, tuple[Any, ...]]] = []
        for index in order:
            custom_id, body = batch.lines[index]
            if index in done:
                line = (self.openai_line(body) if batch.protocol == "openai"
                        else self.anthropic_line(body))
            else:
                line = (missing,)
            results.append((custom_id, line))
        batch.results = results
        batch.state = final
        batch.ended_wall = time.time()
        if batch.protocol == "openai":
            self._write_openai_files(batch)

    def _write_openai_files(self, batch: _Batch) -> None:
        output: list[str] = []
        errors: list[str] = []
        usage = {"input_tokens": 0, "output_tokens": 0, "cached_tokens": 0,
                 "reasoning_tokens": 0}
        for custom_id, line in batch.results:
            line_id = self.new_id("batch_req_")
            if line[0] == "ok":
                body = line[1]
                output.append(_ENC({
                    "id": line_id, "custom_id": custom_id,
                    "response": {"status_code": 200, "request_id": f"req_{line_id}",
                                 "body": body},
                    "error": None,
                }))
                used = body.get("usage", {})
                usage["input_tokens"] += used.get("prompt_tokens", 0)
                usage["output_tokens"] += used.get("completion_tokens", 0)
                usage["cached_tokens"] += used.get("prompt_tokens_details", {}).get(
                    "cached_tokens", 0)
                usage["reasoning_tokens"] += used.get("completion_tokens_details", {}).get(
                    "reasoning_tokens", 0)
            elif line[0] == "error":
                errors.append(_ENC({
                    "id": line_id, "custom_id": custom_id,
                    "response": {"status_code": line[1], "request_id": f"req_{line_id}",
                                 "body": line[2]},
                    "error": None,
                }))
            else:
                code = "batch_expired" if line[0] == "expired" else "batch_cancelled"
                message = (
                    "This request could not be executed before the completion window "
                    "expired." if line[0] == "expired"
                    else "This request was not executed before the batch was cancelled."
                )
                errors.append(_ENC({
                    "id": line_id, "custom_id": custom_id, "response": None,
                    "error": {"code": code, "message": message},
                }))
        if output:
            batch.output_file_id = self.add_file(
                f"{batch.id}_output.jsonl", "batch_output",
                ("\n".join(output) + "\n").encode()).id
        if errors:
            batch.error_file_id = self.add_file(
                f"{batch.id}_error.jsonl", "batch_output",
                ("\n".join(errors) + "\n").encode()).id
        batch.usage = usage

    # -- OpenAI's view -----------------------------------------------------------------

    def openai_card(self, batch: _Batch, *, settle: bool = True) -> dict[str, Any]:
        """The ``batch`` object as OpenAI's API returns it (``settle``: after letting its
        clock advance it)."""
        if settle:
            self.advance(batch)
        created = int(batch.created_wall)
        ended = int(batch.ended_wall) if batch.ended_wall is not None else None
        total = len(batch.lines)
        if batch.results:
            completed = sum(1 for _, line in batch.results if line[0] == "ok")
            failed = total - completed
        elif batch.state == "failed":
            completed = failed = 0
        else:
            completed = int(total * self._done_share(time.monotonic() - batch.created_mono))
            failed = 0
        status = batch.state
        usage = None
        if batch.usage:
            used = batch.usage
            usage = {
                "input_tokens": used["input_tokens"],
                "input_tokens_details": {"cached_tokens": used["cached_tokens"]},
                "output_tokens": used["output_tokens"],
                "output_tokens_details": {"reasoning_tokens": used["reasoning_tokens"]},
                "total_tokens": used["input_tokens"] + used["output_tokens"],
            }
        info = batch.info
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": info.get("endpoint", SUPPORTED_ENDPOINT),
            "model": info.get("model"),
            "errors": info.get("errors"),
            "input_file_id": info.get("input_file_id"),
            "completion_window": info.get("completion_window", "24h"),
            "status": status,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": created,
            "in_progress_at": created if status != "failed" else None,
            "expires_at": created + 86_400,
            "finalizing_at": ended if status == "completed" else None,
            "completed_at": ended if status == "completed" else None,
            "failed_at": created if status == "failed" else None,
            "expired_at": ended if status == "expired" else None,
            "cancelling_at": int(batch.cancel_wall) if batch.cancel_wall else None,
            "cancelled_at": ended if status == "cancelled" else None,
            "request_counts": {"total": total, "completed": completed, "failed": failed},
            "usage": usage,
            "metadata": info.get("metadata"),
        }

    def validate_openai(self, data: bytes, endpoint: str) -> tuple[list[tuple[str, Any]], str | None,
                                                                  list[dict[str, Any]]]:
        """The lines of an input file, its model, and OpenAI-style validation errors."""
        errors: list[dict[str, Any]] = []
        lines: list[tuple[str, Any]] = []
        seen: set[str] = set()
        models: set[str] = set()

        def error(code: str, message: str, line: int | None, param: str | None = None) -> None:
            errors.append({"code": code, "message": message, "param": param, "line": line})

        raw_lines = [raw for raw in data.decode("utf-8", errors="replace").splitlines()]
        if not any(raw.strip() for raw in raw_lines):
            error("empty_file", "The input file has no requests.", None)
        for number, raw in enumerate(raw_lines, start=1):
            if not raw.strip():
                continue
            try:
                item = json.loads(raw)
            except ValueError:
                error("invalid_json_line", "This line is not valid JSON.", number)
                continue
            if not isinstance(item, dict):
                error("invalid_json_line", "Each line must be a JSON object.", number)
                continue
            custom_id = item.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id:
                error("missing_required_parameter", "custom_id is required.", number,
                      "custom_id")
                continue
            if custom_id in seen:
                error("duplicate_custom_id",
                      f"The custom_id {custom_id!r} is used more than once in this file.",
                      number, "custom_id")
                continue
            seen.add(custom_id)
            if item.get("method") != "POST":
                error("invalid_method", "method must be POST.", number, "method")
                continue
            if item.get("url") != endpoint:
                error("mismatched_endpoint",
                      f"url must be the batch's endpoint {endpoint!r}.", number, "url")
                continue
            body = item.get("body")
            if not isinstance(body, dict) or not isinstance(body.get("model"), str):
                error("missing_required_parameter", "body.model is required.", number,
                      "body.model")
                continue
            models.add(body["model"])
            lines.append((custom_id, body))
        if len(models) > 1:
            error("mismatched_model",
                  "All requests in a batch file must use the same model; this file uses "
                  f"{', '.join(sorted(models))}.", None, "body.model")
        if len(lines) > MAX_OPENAI_REQUESTS:
            error("too_many_requests",
                  f"A batch file may hold at most {MAX_OPENAI_REQUESTS:,} requests; this one "
                  f"has {len(lines):,}.", None)
        return lines, (next(iter(models)) if len(models) == 1 else None), errors

    def create_openai(self, payload: dict[str, Any]) -> Payload:
        """``POST /v1/batches``."""
        file_id = payload.get("input_file_id")
        endpoint = payload.get("endpoint")
        window = payload.get("completion_window")
        if not isinstance(file_id, str) or file_id not in self.files:
            return openai_api.error_payload(
                400, f"Invalid 'input_file_id': no file with id {file_id!r}.",
                param="input_file_id")
        if endpoint != SUPPORTED_ENDPOINT:
            return openai_api.error_payload(
                400, f"Invalid 'endpoint' {endpoint!r}: the fake server batches "
                f"{SUPPORTED_ENDPOINT} only.", param="endpoint")
        if window != "24h":
            return openai_api.error_payload(
                400, "Invalid 'completion_window': only '24h' is supported.",
                param="completion_window")
        stored = self.files[file_id]
        if stored.purpose != "batch":
            return openai_api.error_payload(
                400, f"File {file_id!r} was uploaded with purpose {stored.purpose!r}, not "
                "'batch'.", param="input_file_id")
        lines, model, errors = self.validate_openai(stored.data, endpoint)
        batch = _Batch(self.new_id("batch_"), "openai", [] if errors else lines, time.time(),
                       time.monotonic())
        batch.info = {"input_file_id": file_id, "endpoint": endpoint,
                      "completion_window": window, "metadata": payload.get("metadata"),
                      "model": model}
        card_status = "validating"
        if errors:
            batch.state = "failed"
            batch.info["errors"] = {"object": "list", "data": errors}
            card_status = "failed"
        else:
            self._count_lines(model or "", len(lines))
        with self._lock:
            self.batches[batch.id] = batch
        self.hub.count("batches_created")
        # The create reply shows the batch being validated, as OpenAI's does; its clock
        # moves it on from the next look.
        card = self.openai_card(batch, settle=False)
        card["status"] = card_status
        if not errors:
            card["in_progress_at"] = None
        return json_payload(200, card)

    def _count_lines(self, model: str, count: int) -> None:
        self.hub.count_model(model, "batch_lines", count)
        self.hub.count("batch_lines", count)

    def cancel(self, batch: _Batch) -> None:
        """Start cancelling a batch still in progress (it settles on the next look)."""
        with self._lock:
            self.advance(batch)
            if batch.state == "in_progress":
                batch.state = "cancelling"
                batch.cancel_mono = time.monotonic()
                batch.cancel_wall = time.time()

    # -- Anthropic's view --------------------------------------------------------------

    def anthropic_card(self, batch: _Batch, *, settle: bool = True) -> dict[str, Any]:
        """The ``message_batch`` object as Anthropic's API returns it."""
        if settle:
            self.advance(batch)
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if batch.results:
            for _, line in batch.results:
                key = {"ok": "succeeded", "error": "errored", "expired": "expired",
                       "cancelled": "canceled"}[line[0]]
                counts[key] += 1
        else:
            counts["processing"] = len(batch.lines)
        ended = batch.state in ("completed", "expired", "cancelled")
        status = "ended" if ended else ("canceling" if batch.state == "cancelling"
                                        else "in_progress")
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": counts,
            "ended_at": _iso(batch.ended_wall) if ended else None,
            "created_at": _iso(batch.created_wall),
            "expires_at": _iso(batch.created_wall + 86_400),
            "archived_at": None,
            "cancel_initiated_at": _iso(batch.cancel_wall),
            "results_url": (f"{self._root_url()}/v1/messages/batches/{batch.id}/results"
                            if ended else None),
        }

    def create_anthropic(self, payload: Any, size: int) -> Payload:
        """``POST /v1/messages/batches``."""
        requests = payload.get("requests") if isinstance(payload, dict) else None
        if not isinstance(requests, list) or not requests:
            return anthropic_api.error_payload(400, "requests: Field required (a non-empty list)")
        if len(requests) > MAX_ANTHROPIC_REQUESTS or size > MAX_ANTHROPIC_BYTES:
            return anthropic_api.error_payload(
                413, f"A batch may hold at most {MAX_ANTHROPIC_REQUESTS:,} requests and "
                f"{MAX_ANTHROPIC_BYTES // 2**20} MB.")
        seen: set[str] = set()
        lines: list[tuple[str, Any]] = []
        for index, item in enumerate(requests):
            custom_id = item.get("custom_id") if isinstance(item, dict) else None
            if not isinstance(custom_id, str) or not _CUSTOM_ID.match(custom_id):
                return anthropic_api.error_payload(
                    400, f"requests.{index}.custom_id: must match ^[a-zA-Z0-9_-]{{1,64}}$")
            if custom_id in seen:
                return anthropic_api.error_payload(
                    400, f"requests.{index}.custom_id: {custom_id!r} is not unique")
            seen.add(custom_id)
            params = item.get("params")
            if not isinstance(params, dict):
                return anthropic_api.error_payload(400, f"requests.{index}.params: Field required")
            lines.append((custom_id, params))
        batch = _Batch(self.new_id("msgbatch_"), "anthropic", lines, time.time(), time.monotonic())
        for model, count in _models_of(params for _, params in lines).items():
            self._count_lines(model, count)
        with self._lock:
            self.batches[batch.id] = batch
        self.hub.count("batches_created")
        return json_payload(200, self.anthropic_card(batch, settle=False))

    def anthropic_results(self, batch: _Batch) -> bytes:
        """The ``.jsonl`` results of an ended batch."""
        out: list[str] = []
        for custom_id, line in batch.results:
            if line[0] == "ok":
                result: dict[str, Any] = {"type": "succeeded", "message": line[1]}
            elif line[0] == "error":
                result = {"type": "errored", "error": line[2]}
            elif line[0] == "expired":
                result = {"type": "expired"}
            else:
                result = {"type": "canceled"}
            out.append(_ENC({"custom_id": custom_id, "result": result}))
        return ("\n".join(out) + "\n").encode() if out else b""


def _models_of(params: Iterable[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in params:
        model = item.get("model") if isinstance(item, dict) else None
        key = model if isinstance(model, str) else ""
        counts[key] = counts.get(key, 0) + 1
    return counts


def _page(items: list[dict[str, Any]], request: web.Request, *, after_key: str) -> dict[str, Any]:
    try:
        limit = max(1, min(1000, int(request.query.get("limit", "20"))))
    except ValueError:
        limit = 20
    after = request.query.get(after_key)
    if after:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return {
        "data": page,
        "has_more": len(items) > limit,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
    }


def add_routes(app: web.Application, store: BatchStore) -> None:
    """Serve the Files, Batches and Message Batches routes on ``app``."""

    def not_found(kind: str, ident: str) -> web.Response:
        return respond(openai_api.error_payload(
            404, f"No {kind} found with id {ident!r}.", code="not_found"))

    async def upload(request: web.Request) -> web.StreamResponse:
        if not request.content_type.startswith("multipart/"):
            return respond(openai_api.error_payload(
                400, "Uploads must be multipart/form-data with 'file' and 'purpose'."))
        form = await request.post()
        purpose = form.get("purpose")
        upload_field = form.get("file")
        if not isinstance(purpose, str) or not purpose:
            return respond(openai_api.error_payload(
                400, "'purpose' is required.", param="purpose"))
        if not isinstance(upload_field, web.FileField):
            return respond(openai_api.error_payload(400, "'file' is required.", param="file"))
        data = upload_field.file.read()
        if purpose == "batch" and len(data) > MAX_FILE_BYTES:
            return respond(openai_api.error_payload(
                400, f"A batch input file may be at most {MAX_FILE_BYTES // 2**20} MB.",
                param="file"))
        stored = store.add_file(upload_field.filename or "upload", purpose, data)
        return respond(json_payload(200, stored.card()))

    async def list_files(request: web.Request) -> web.StreamResponse:
        cards = [f.card() for f in sorted(store.files.values(), key=lambda f: f.id,
                                          reverse=True)]
        return respond(json_payload(200, {"object": "list", **_page(cards, request,
                                                                     after_key="after")}))

    async def one_file(request: web.Request) -> web.StreamResponse:
        ident = request.match_info["file_id"]
        stored = store.files.get(ident)
        if stored is None:
            return not_found("file", ident)
        if request.method == "DELETE":
            store.files.pop(ident, None)
            return respond(json_payload(200, {"id": ident, "object": "file", "deleted": True}))
        return respond(json_payload(200, stored.card()))

    async def file_content(request: web.Request) -> web.StreamResponse:
        ident = request.match_info["file_id"]
        stored = store.files.get(ident)
        if stored is None:
            return not_found("file", ident)
        return respond(Payload(200, stored.data, "application/octet-stream"))

    async def create_batch(request: web.Request) -> web.StreamResponse:
        try:
            payload = json.loads(await request.read())
        except ValueError:
            return respond(openai_api.error_payload(400, "The body is not valid JSON."))
        if not isinstance(payload, dict):
            return respond(openai_api.error_payload(400, "The body must be a JSON object."))
        return respond(store.create_openai(payload))

    async def list_batches(request: web.Request) -> web.StreamResponse:
        batches = [b for b in store.batches.values() if b.protocol == "openai"]
        cards = [store.openai_card(b) for b in sorted(batches, key=lambda b: b.id,
                                                      reverse=True)]
        return respond(json_payload(200, {"object": "list", **_page(cards, request,
                                                                     after_key="after")}))

    def openai_batch(request: web.Request) -> _Batch | None:
        batch = store.batches.get(request.match_info["batch_id"])
        return batch if batch is not None and batch.protocol == "openai" else None

    async def one_batch(request: web.Request) -> web.StreamResponse:
        batch = openai_batch(request)
        if batch is None:
            return not_found("batch", request.match_info["batch_id"])
        return respond(json_payload(200, store.openai_card(batch)))

    async def cancel_batch(request: web.Request) -> web.StreamResponse:
        batch = openai_batch(request)
        if batch is None:
            return not_found("batch", request.match_info["batch_id"])
        store.cancel(batch)
        # The reply shows the batch cancelling; it settles on the next retrieve.
        return respond(json_payload(200, store.openai_card(batch, settle=False)))

    # -- Anthropic ---------------------------------------------------------------------

    def anthropic_batch(request: web.Request) -> _Batch | web.Response:
        refused = anthropic_api.check_headers(request)
        if refused is not None:
            return respond(refused)
        ident = request.match_info["batch_id"]
        batch = store.batches.get(ident)
        if batch is None or batch.protocol != "anthropic":
            return respond(anthropic_api.error_payload(
                404, f"No message batch found with id {ident!r}."))
        return batch

    async def create_message_batch(request: web.Request) -> web.StreamResponse:
        refused = anthropic_api.check_headers(request)
        if refused is not None:
            return respond(refused)
        body = await request.read()
        try:
            payload = json.loads(body)
        except ValueError:
            return respond(anthropic_api.error_payload(400, "The body is not valid JSON."))
        return respond(store.create_anthropic(payload, len(body)))

    async def list_message_batches(request: web.Request) -> web.StreamResponse:
        refused = anthropic_api.check_headers(request)
        if refused is not None:
            return respond(refused)
        batches = [b for b in store.batches.values() if b.protocol == "anthropic"]
        cards = [store.anthropic_card(b) for b in sorted(batches, key=lambda b: b.id,
                                                         reverse=True)]
        return respond(json_payload(200, _page(cards, request, after_key="after_id")))

    async def one_message_batch(request: web.Request) -> web.StreamResponse:
        batch = anthropic_batch(request)
        if isinstance(batch, web.Response):
            return batch
        if request.method == "DELETE":
            store.batches.pop(batch.id, None)
            return respond(json_payload(200, {"id": batch.id, "type": "message_batch_deleted"}))
        return respond(json_payload(200, store.anthropic_card(batch)))

    async def cancel_message_batch(request: web.Request) -> web.StreamResponse:
        batch = anthropic_batch(request)
        if isinstance(batch, web.Response):
            return batch
        store.cancel(batch)
        return respond(json_payload(200, store.anthropic_card(batch, settle=False)))

    async def message_batch_results(request: web.Request) -> web.StreamResponse:
        batch = anthropic_batch(request)
        if isinstance(batch, web.Response):
            return batch
        store.advance(batch)
        if not batch.results and batch.state not in ("completed", "expired", "cancelled"):
            return respond(anthropic_api.error_payload(
                400, f"Message batch {batch.id!r} has not ended yet."))
        return respond(Payload(200, store.anthropic_results(batch), "application/binary"))

    app.router.add_post("/v1/files", upload)
    app.router.add_get("/v1/files", list_files)
    app.router.add_route("GET", "/v1/files/{file_id}", one_file)
    app.router.add_route("DELETE", "/v1/files/{file_id}", one_file)
    app.router.add_get("/v1/files/{file_id}/content", file_content)
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches", list_batches)
    app.router.add_get("/v1/batches/{batch_id}", one_batch)
    app.router.add_post("/v1/batches/{batch_id}/cancel", cancel_batch)
    app.router.add_post("/v1/messages/batches", create_message_batch)
    app.router.add_get("/v1/messages/batches", list_message_batches)
    app.router.add_route("GET", "/v1/messages/batches/{batch_id}", one_message_batch)
    app.router.add_route("DELETE", "/v1/messages/batches/{batch_id}", one_message_batch)
    app.router.add_post("/v1/messages/batches/{batch_id}/cancel", cancel_message_batch)
    app.router.add_get("/v1/messages/batches/{batch_id}/results", message_batch_results)
