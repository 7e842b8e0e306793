"""FakeLLMServer: a real model server on loopback, for offline tests and benchmarks.

It is the only stand-in in the project: everything talks to it over real sockets, the
way it would talk to a remote model, and the official SDKs work against it.

What it speaks
    ``POST /v1/chat/completions`` (JSON, or SSE with ``"stream": true``; a forced
    ``tool_choice`` function is answered as a ``tool_calls`` message) and
    ``GET /v1/models[/{id}]``, each also without the ``/v1`` prefix; Anthropic's
    ``POST /v1/messages`` (and ``/v1/messages/count_tokens``); the Batch APIs: OpenAI's
    ``POST/GET /v1/files``, ``GET/DELETE /v1/files/{id}``, ``GET /v1/files/{id}/content``,
    ``POST/GET /v1/batches``, ``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``
    and Anthropic's ``POST/GET /v1/messages/batches``, ``GET/DELETE
    /v1/messages/batches/{id}``, ``.../cancel`` and ``.../results`` (JSONL at the batch's
    ``results_url``). OpenAI batches are validated as OpenAI does (JSON lines with a
    unique ``custom_id``, ``POST`` to the batch's endpoint, one model per file, at most
    50,000 requests and 200 MB; a bad file fails the batch with ``errors``), and their
    output comes shuffled, failed lines in the error file. Azure OpenAI's
    ``/openai/deployments/{deployment}/chat/completions?api-version=...`` (an ``api-key``
    header or a Bearer token; the deployment names the model; 404 without
    ``api-version``) and ``/openai/v1/chat/completions``, and Gemini's OpenAI-compatible
    ``/v1beta/openai/chat/completions`` (a Bearer key; its streams carry the running
    usage on every chunk) and ``/v1beta/openai/models``. ``GET /stats`` and
    ``POST /stats/reset`` read and zero the counters from any process
    (:func:`fetch_stats`, :func:`reset_stats`). Any other path is a 404 in OpenAI's error
    shape.

Who answers (:class:`FakeLLMServer` arguments)
    ``responder(messages)`` answers every request (default :func:`echo_responder`:
    ``"ECHO x"`` gives ``"x"``); ``scripts={model: [turn, ...]}`` answers a model from a
    script by assistant-turn count; ``json_responder(messages, response_format)``
    answers structured requests, and ``response_format=False`` refuses them with a 400.
    A responder returns a str, a JSON value (sent as JSON text) or a :class:`Fault`.
    ``reasoning={model: n}`` reports ``n`` reasoning tokens per reply of that model.
    :func:`rlm_responder` is a scripted RLM for offline runs: a root turn (recognised by
    the root's system prompt) gets code that cuts any context into excerpts and fans out
    ``llm_query_batch``, then ``FINAL`` with what came back; a sub-query gets the
    excerpt's sentences sharing most words with the question; ``ECHO x`` gives ``x``.
    :func:`random_faults` and :func:`token_bucket` wrap a responder with load-shaped
    failures.

Faults (:class:`Fault`, :meth:`FakeLLMServer.inject`)
    ``429``, ``500``, ``503``, ``529``, ``hang``, ``drop``, ``malformed``,
    ``context_length``, ``cut`` (a stream cut after its first chunk), ``no_usage``,
    ``detail`` (a FastAPI ``{"detail": ...}`` body), ``stream_error`` (an error event in a
    200 stream); any of them may carry extra ``headers``.

Batches (:class:`BatchOptions`, ``FakeLLMServer(batches=...)``)
    ``delay`` seconds until a batch completes, a ``failure_rate`` share of lines failing,
    ``expire_after`` seconds for the window (done lines kept, the rest
    ``batch_expired``), ``seed``. A batch advances with the clock and is settled by the
    first request that looks at it once due. Lines are answered by the same responders;
    ``stats()`` counts ``batch_lines`` (per model too), ``batches_created`` and
    ``files_created`` apart from live ``requests``.

Latency and counters
    ``latency`` (seconds, or a ``(lo, hi)`` range) is waited with a timer, so N
    concurrent requests take about one latency in all. ``requests``, ``in_flight``,
    ``peak_in_flight``, ``streams``, ``faults_served``, ``connections``,
    ``open_connections`` and ``stats()`` (with per-model rows) prove concurrency and
    connection reuse; ``requests_log`` keeps the last 1000 requests (URL and auth header
    shape included, never a key's value).

How to run it
    In-process: ``with FakeLLMServer() as server:`` serves on a background thread,
    ``async with FakeLLMServer() as server:`` on the caller's loop; ``server.url`` is the
    OpenAI SDK's base URL. As its own process: ``python -m rlm.testing --port 0
    --latency 0.5`` prints ``READY http://127.0.0.1:PORT/v1`` once listening
    (:func:`spawn_fake_server` runs it and yields the URL). Its options: ``--host``,
    ``--port``, ``--latency``, ``--latency-max``, ``--model``, ``--responder rlm|echo``
    (default ``rlm``: :func:`rlm_responder`, so ``rlm run --base-url URL --api-key x
    --context FILE --query ...`` works offline), ``--fault-rate`` (0 to 1),
    ``--fault-kinds``, ``--retry-after``, ``--retry-after-on``, ``--rate-limit`` (req/s)
    and ``--burst`` (the :func:`token_bucket` responder), ``--limit MODEL:KEY=VALUE,...``
    (per-model limits, repeatable), ``--reasoning MODEL=TOKENS``, ``--no-prefix-cache``,
    ``--no-fast-path``, ``--batch-delay``, ``--batch-failure-rate``,
    ``--batch-expire-after``, ``--seed``; bad values print one line and exit 2.

The HTTP layer is ``aiohttp.web`` (its C parser), in a module apart from each protocol's
shapes (``openai_api``), the shared request pipeline and counters (``hub``), what the
model says (``model``, ``responders``, ``scripted``), faults (``faults``), rate limits
(``limits``), prompt caching (``caching``), the Batch APIs (``batches``), the Anthropic
protocol (``anthropic_api``), Azure's and Gemini's addresses (``openai_dialects``), the
launcher and the command line.
"""

from __future__ import annotations

from rlm.testing.batches import BatchOptions
from rlm.testing.cli import main
from rlm.testing.faults import FAULT_KINDS, Fault
from rlm.testing.launcher import fetch_stats, reset_stats, spawn_fake_server
from rlm.testing.limits import Limit
from rlm.testing.responders import (
    JSONResponder,
    Reply,
    Responder,
    echo_responder,
    random_faults,
    token_bucket,
)
from rlm.testing.scripted import rlm_responder
from rlm.testing.server import FakeLLMServer

__all__ = [
    "FAULT_KINDS",
    "BatchOptions",
    "FakeLLMServer",
    "Fault",
    "JSONResponder",
    "Limit",
    "Reply",
    "Responder",
    "echo_responder",
    "fetch_stats",
    "main",
    "random_faults",
    "reset_stats",
    "rlm_responder",
    "spawn_fake_server",
    "token_bucket",
]
