"""Anthropic's Messages API, native: ``POST {base_url}/v1/messages``.

The client speaks in OpenAI-shaped bodies (``Request.body``: ``messages`` with system
turns, ``max_tokens``, ``response_format``...); this adapter turns one into a Messages
body and the answer back into a ``Reply``:

- the leading system messages become the top-level ``system``; a later system message
  reads as the user's; consecutive turns of one role are merged (Anthropic wants them
  alternating); ``max_tokens`` is always sent (the request's, else a per-model default);
- prompt caching: a ``cache_control`` breakpoint on the system prompt and, once a
  conversation has history, on its newest user turn, so the next turn of a root model
  (which re-sends its whole history) reads everything up to there from the cache. A
  one-turn prompt, a sub-query, marks no message: writing it would cost 1.25x for a
  prefix nothing reads again;
- ``response_format`` ``json_schema`` (and ``json_object``) becomes a forced tool call
  whose ``input_schema`` is the schema; the tool's input is the reply's JSON text (a
  schema whose root is not an object is wrapped in ``{"answer": ...}`` and unwrapped);
- usage: ``prompt_tokens`` = ``input_tokens`` + ``cache_read_input_tokens`` +
  ``cache_creation_input_tokens``, the last two also apart as ``cached_input_tokens``
  and ``cache_creation_tokens``;
- errors: 429 ``rate_limit_error`` (with ``retry-after``) is a ``RateLimitError``, 529
  ``overloaded_error`` a refusal retried like a 503 (``rlm.retries``), "prompt is too
  long" a 400 that sub-queries read as the window error; limits come from the
  ``anthropic-ratelimit-*`` headers; streams are Anthropic's named events.

Posting goes through the client's shared aiohttp session like every provider: the
official ``anthropic`` SDK (the ``[anthropic]`` extra) is not on the request path; the
test suite runs it against the fake server to keep both honest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from rlm.errors import ConfigError, LLMError, ResponseError
from rlm.providers.base import (
    Adapter,
    HTTPRequest,
    Reply,
    Request,
    StreamEvent,
    not_a_reply,
    token_count,
)
from rlm.providers.ratelimits import RateLimits, anthropic_limits

__all__ = ["ANTHROPIC_VERSION", "AnthropicAdapter", "default_max_tokens", "messages_body"]

ANTHROPIC_VERSION = "2023-06-01"

# Completion cap sent when a request sets none (Anthropic requires one): the model's own
# maximum, kept at most 16,384 so a non-streamed reply stays well inside a timeout (the
# SDK refuses non-streamed requests that could run past ten minutes) and output-token
# rate limits are not charged for tokens no answer uses. Longest matching prefix wins.
_MAX_TOKENS = (
    ("claude-3-haiku", 4096),
    ("claude-3-opus", 4096),
    ("claude-3-sonnet", 4096),
    ("claude-3-5", 8192),
    ("claude-3-7", 16384),
    ("claude-", 16384),
)
DEFAULT_MAX_TOKENS = 8192

# OpenAI parameters with no Messages equivalent: not sent (rather than refused, so REPL
# code written for another provider keeps working).
_DROPPED = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "response_format", "stop",
    "presence_penalty", "frequency_penalty", "logit_bias", "seed", "logprobs",
    "top_logprobs", "stream_options", "reasoning_effort", "parallel_tool_calls", "store",
    "modalities", "service_tier", "user", "n",
})
_EPHEMERAL = {"type": "ephemeral"}
_TOOL_NAME = re.compile(r"[^a-zA-Z0-9_-]")
_WRAP = "answer"
_STOP = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
         "tool_use": "stop", "max_tokens": "length", "refusal": "content_filter"}
_DONE = StreamEvent(done=True)


def default_max_tokens(model: str) -> int:
    """The ``max_tokens`` sent for ``model`` when a request sets none."""
    for prefix, cap in _MAX_TOKENS:
        if model.startswith(prefix):
            return cap
    return DEFAULT_MAX_TOKENS


def _image(url: str) -> dict[str, Any]:
    if url.startswith("data:") and ";base64," in url:
        head, _, data = url.partition(";base64,")
        return {"type": "image", "source": {"type": "base64", "media_type": head[5:],
                                            "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _blocks(content: Any) -> list[dict[str, Any]]:
    """A message's content as Messages content blocks (empty text left out: Anthropic
    refuses empty text blocks)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        return [{"type": "text", "text": str(content)}]
    out: list[dict[str, Any]] = []
    for part in content:
        if isinstance(part, str):
            if part:
                out.append({"type": "text", "text": part})
        elif isinstance(part, Mapping):
            kind = part.get("type")
            if kind == "text":
                if part.get("text"):
                    out.append(dict(part))
            elif kind == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, Mapping) else image
                if isinstance(url, str):
                    out.append(_image(url))
            else:  # Already a Messages block (image, document, tool_use...).
                out.append(dict(part))
    return out


def _text_of(blocks: list[dict[str, Any]]) -> str:
    return "\n\n".join(str(b.get("text", "")) for b in blocks if b.get("type") == "text")


def _tool_plan(response_format: Any) -> tuple[str, dict[str, Any], bool] | None:
    """The forced tool a ``response_format`` becomes: (name, input_schema, wrapped), or
    None for plain text. ``wrapped``: the schema's root is not an object, so it sits
    under ``{"answer": ...}`` (a tool's input is always an object)."""
    if not isinstance(response_format, Mapping):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return "json_answer", {"type": "object"}, False
    if kind != "json_schema":
        return None
    spec = response_format.get("json_schema")
    spec = spec if isinstance(spec, Mapping) else {}
    schema = spec.get("schema")
    schema = dict(schema) if isinstance(schema, Mapping) else {"type": "object"}
    name = _TOOL_NAME.sub("_", str(spec.get("name") or "answer"))[:64] or "answer"
    if schema.get("type") == "object" or ("type" not in schema and "properties" in schema):
        return name, schema, False
    # References point at the root's definitions ("#/$defs/X"): keep them at the root.
    wrapper: dict[str, Any] = {"type": "object", "properties": {}, "required": [_WRAP]}
    for key in ("$defs", "definitions"):
        if key in schema:
            wrapper[key] = schema.pop(key)
    wrapper["properties"][_WRAP] = schema
    return name, wrapper, True


def messages_body(body: Mapping[str, Any], model: str | None = None) -> dict[str, Any]:
    """The Messages body for an OpenAI-shaped chat body (see the module docstring);
    ``model`` replaces the body's model name."""
    system: list[dict[str, Any]] = []
    turns: list[tuple[str, list[dict[str, Any]]]] = []
    for message in body.get("messages") or ():
        if not isinstance(message, Mapping):
            continue
        role = message.get("role")
        blocks = _blocks(message.get("content"))
        if role in ("system", "developer"):
            if not turns:
                system.extend(blocks)
                continue
            role = "user"
        elif role != "assistant":
            role = "user"
        if not blocks:
            continue
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(blocks)
        else:
            turns.append((role, blocks))
    if not turns:
        # Only a system prompt: Anthropic needs a user turn, so it becomes one.
        turns.append(("user", system or [{"type": "text", "text": "."}]))
        system = []
    if turns[-1][0] == "assistant":
        # A prefilled answer may not end in whitespace.
        last = turns[-1][1][-1]
        if last.get("type") == "text":
            last["text"] = str(last["text"]).rstrip() or "."
    marked = any("cache_control" in b for b in system) or any(
        "cache_control" in b for _, blocks in turns for b in blocks)
    if not marked:
        if system:
            system[-1] = {**system[-1], "cache_control": _EPHEMERAL}
        users = [i for i, (role, _) in enumerate(turns) if role == "user"]
        if len(users) > 1:
            blocks = turns[users[-1]][1]
            blocks[-1] = {**blocks[-1], "cache_control": _EPHEMERAL}
    name = model or str(body.get("model", ""))
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    out: dict[str, Any] = {
        "model": name,
        "max_tokens": max_tokens if isinstance(max_tokens, int) else default_max_tokens(name),
    }
    if system:
        out["system"] = system
    out["messages"] = [{"role": role, "content": blocks} for role, blocks in turns]
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        raise ConfigError("Anthropic answers one reply per request: send n requests instead "
                          f"of n={n}")
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    temperature = body.get("temperature")
    if isinstance(temperature, int | float):
        out["temperature"] = min(float(temperature), 1.0)  # OpenAI's range is 0-2
    for key, value in body.items():
        if key not in _DROPPED and key not in out and key != "temperature" and value is not None:
            out[key] = value
    plan = _tool_plan(body.get("response_format"))
    if plan is not None:
        tool, schema, _ = plan
        out["tools"] = [{"name": tool, "description": "Give the answer as this tool's input.",
                         "input_schema": schema}]
        out["tool_choice"] = {"type": "tool", "name": tool}
    return out


class AnthropicAdapter(Adapter):
    """Anthropic's Messages API with prompt caching, forced-tool structured answers and
    its ``anthropic-ratelimit-*`` headers.

    ``base_url`` is the API root as the ``anthropic`` SDK takes it
    (https://api.anthropic.com; a trailing ``/v1`` is tolerated); requests go to
    ``{base_url}/v1/messages`` with ``x-api-key`` and ``anthropic-version``.
    """

    name = "anthropic"
    key_env = "ANTHROPIC_API_KEY"
    base_url_env = "ANTHROPIC_BASE_URL"
    default_base_url = "https://api.anthropic.com"

    def __init__(self, base_url: str | None, api_key: str) -> None:
        super().__init__(base_url, api_key)
        from rlm import __version__

        self.base_url = self.base_url.removesuffix("/v1")
        self.url = self.base_url + "/v1/messages"
        self.headers = {
            "x-api-key": api_key,
            "anthropic-version": ANTHROPIC_VERSION,
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"rlm/{__version__}",
        }
        self.stream_headers = {**self.headers, "Accept": "text/event-stream"}

    def wire_model(self, model: str) -> str:
        """The model name Anthropic is sent (a leading ``anthropic/`` taken off)."""
        return model.removeprefix("anthropic/")

    def build(self, request: Request, *, stream: bool = False) -> HTTPRequest:
        """The POST of the Messages body for ``request`` (``stream``: its events)."""
        body = messages_body(request.body, self.wire_model(request.model))
        if stream:
            body["stream"] = True
            return HTTPRequest(self.url, self.stream_headers, json.dumps(body).encode())
        body.pop("stream", None)
        return HTTPRequest(self.url, self.headers, json.dumps(body).encode())

    def parse_reply(self, data: Any, request: Request) -> Reply:
        """The text (or the forced tool's input as JSON text), model, usage and stop
        reason of a ``message``."""
        content = data.get("content") if isinstance(data, Mapping) else None
        if not isinstance(content, list):
            raise not_a_reply("a Messages reply (no content list)", data)
        plan = _tool_plan(request.body.get("response_format"))
        text = None
        if plan is not None:
            for block in content:
                if isinstance(block, Mapping) and block.get("type") == "tool_use":
                    value = block.get("input")
                    if plan[2] and isinstance(value, Mapping) and _WRAP in value:
                        value = value[_WRAP]
                    text = json.dumps(value, ensure_ascii=False)
                    break
        if text is None:
            text = "".join(str(b.get("text", "")) for b in content
                           if isinstance(b, Mapping) and b.get("type") == "text")
        model = data.get("model") or request.model
        finish = _STOP.get(str(data.get("stop_reason")), data.get("stop_reason"))
        usage = data.get("usage")
        if not isinstance(usage, Mapping):
            return Reply(text, model, 0, 0, finish_reason=finish, usage_reported=False)
        read = token_count(usage.get("cache_read_input_tokens"))
        written = token_count(usage.get("cache_creation_input_tokens"))
        prompt = token_count(usage.get("input_tokens")) + read + written
        return Reply(text, model, prompt, token_count(usage.get("output_tokens")), read, written,
                     0, finish)

    def parse_stream_event(self, event: str, data: str) -> StreamEvent | None:
        """One named event of a streamed message: text and JSON deltas, the usage of
        ``message_start`` and ``message_delta``, the stop reason, ``error``."""
        try:
            payload = json.loads(data)
        except ValueError:
            return StreamEvent(error=ResponseError(
                f"a streamed event is not valid JSON: {data[:200]!r}"))
        if not isinstance(payload, Mapping):
            return None
        kind = payload.get("type") or event
        if kind == "content_block_delta":
            delta = payload.get("delta")
            if isinstance(delta, Mapping):
                piece = delta.get("text") if delta.get("type") == "text_delta" else (
                    delta.get("partial_json") if delta.get("type") == "input_json_delta"
                    else None)
                if isinstance(piece, str) and piece:
                    return StreamEvent(piece)
            return None
        if kind == "content_block_start":
            block = payload.get("content_block")
            if isinstance(block, Mapping) and block.get("type") == "text" and block.get("text"):
                return StreamEvent(str(block["text"]))
            return None
        if kind == "message_start":
            message = payload.get("message")
            message = message if isinstance(message, Mapping) else {}
            return StreamEvent(model=message.get("model"), usage=self._usage(message.get("usage")))
        if kind == "message_delta":
            delta = payload.get("delta")
            reason = delta.get("stop_reason") if isinstance(delta, Mapping) else None
            finish = _STOP.get(str(reason), reason) if reason else None
            return StreamEvent(usage=self._usage(payload.get("usage")), finish_reason=finish)
        if kind == "message_stop":
            return _DONE
        if kind == "error":
            return StreamEvent(error=self.stream_error(payload) or LLMError(
                f"the stream reported an error: {data[:200]}"))
        return None

    @staticmethod
    def _usage(usage: Any) -> tuple[int, int] | None:
        # message_start carries the input side, message_delta the running output count
        # (and, from newer servers, the input side again): the client keeps the larger of
        # each, so neither is counted twice.
        if not isinstance(usage, Mapping):
            return None
        prompt = sum(token_count(usage.get(k)) for k in (
            "input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"))
        return prompt, token_count(usage.get("output_tokens"))

    def parse_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> LLMError:
        """As the base class; a 400 about a tool's ``input_schema`` (a schema Anthropic
        cannot take) names ``response_format``, so structured sub-queries fall back to
        asking in words as they do with any server that refuses the format."""
        error = super().parse_error(status, headers, raw)
        if status == 400 and "input_schema" in str(error):
            return LLMError(f"response_format json_schema refused: {error}", status=status,
                            retry_after=error.retry_after)
        return error

    def parse_limits(self, headers: Any) -> RateLimits | None:
        """Anthropic's ``anthropic-ratelimit-*`` headers."""
        return anthropic_limits(headers)

