"""The OpenAI-compatible wire format: ``POST {base_url}/chat/completions``.

Spoken by OpenAI itself and by most local and hosted servers (vLLM, Ollama, llama.cpp,
LiteLLM, OpenRouter, Together...). Holds only the request building and reply, stream,
error and rate-limit header parsing of that format; nothing here does I/O.
"""

from __future__ import annotations

import json
import os
from typing import Any

from rlm.errors import ResponseError
from rlm.providers.base import (
    Adapter,
    HTTPRequest,
    Reply,
    Request,
    StreamEvent,
    not_a_reply,
    token_count,
)
from rlm.providers.ratelimits import RateLimits, openai_limits

_DONE = StreamEvent(done=True)
_NOTHING = StreamEvent()


class OpenAICompatAdapter(Adapter):
    """Chat completions in OpenAI's format, with its ``x-ratelimit-*`` headers.

    Sends ``Authorization: Bearer <key>`` and, when set in the environment,
    ``OpenAI-Organization`` ($OPENAI_ORG_ID) and ``OpenAI-Project`` ($OPENAI_PROJECT_ID),
    as the official SDK does.
    """

    name = "openai"
    key_env = "OPENAI_API_KEY"
    base_url_env = "OPENAI_BASE_URL"
    default_base_url = "https://api.openai.com/v1"

    def __init__(self, base_url: str | None, api_key: str) -> None:
        super().__init__(base_url, api_key)
        from rlm import __version__

        self.url = self.base_url + "/chat/completions"
        headers = {
            **self.auth_headers(api_key),
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"rlm/{__version__}",
        }
        self.headers = headers
        self.stream_headers = {**headers, "Accept": "text/event-stream"}

    def auth_headers(self, api_key: str) -> dict[str, str]:
        """The headers that say who is calling (subclasses for other providers' auth)."""
        headers = {"Authorization": f"Bearer {api_key}"}
        for env, header in (("OPENAI_ORG_ID", "OpenAI-Organization"),
                            ("OPENAI_PROJECT_ID", "OpenAI-Project")):
            value = os.environ.get(env)
            if value:
                headers[header] = value
        return headers

    def url_for(self, request: Request) -> str:
        """Where ``request`` is posted (one URL here; Azure's depends on the deployment)."""
        return self.url

    def build(self, request: Request, *, stream: bool = False) -> HTTPRequest:
        """The POST for ``request``; a stream asks for usage in its last event."""
        body = request.body
        if stream:
            body = {**body, "stream": True, "stream_options": {"include_usage": True}}
            return HTTPRequest(self.url_for(request), self.stream_headers,
                               json.dumps(body).encode())
        return HTTPRequest(self.url_for(request), self.headers, json.dumps(body).encode())

    def parse_reply(self, data: Any, request: Request) -> Reply:
        """The text, model, usage and finish reason of a chat completion body."""
        try:
            choice = data["choices"][0]
            content = choice["message"].get("content")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise not_a_reply("a chat completion (no choices[0].message)", data) from None
        usage = data.get("usage")
        model = data.get("model") or request.model
        finish = choice.get("finish_reason") if isinstance(choice, dict) else None
        if not isinstance(usage, dict):
            return Reply(content or "", model, 0, 0, finish_reason=finish, usage_reported=False)
        cached = reasoning = 0
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict):
            cached = token_count(details.get("cached_tokens"))
        details = usage.get("completion_tokens_details")
        if isinstance(details, dict):
            reasoning = token_count(details.get("reasoning_tokens"))
        return Reply(content or "", model, token_count(usage.get("prompt_tokens")),
                     token_count(usage.get("completion_tokens")), cached, 0, reasoning, finish)

    def parse_stream_event(self, event: str, data: str) -> StreamEvent | None:
        """One ``data:`` event of a streamed chat completion (``[DONE]`` ends it)."""
        if data == "[DONE]":
            return _DONE
        try:
            chunk = json.loads(data)
        except ValueError:
            return StreamEvent(error=ResponseError(
                f"a streamed event is not valid JSON: {data[:200]!r}"))
        if not isinstance(chunk, dict):
            return _NOTHING
        error = self.stream_error(chunk)
        if error is not None:
            return StreamEvent(error=error)
        text = ""
        finish = None
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                piece = delta.get("content")
                if isinstance(piece, str):
                    text += piece
            finish = choice.get("finish_reason") or finish
        usage = chunk.get("usage")
        counts = None
        if isinstance(usage, dict):
            counts = (token_count(usage.get("prompt_tokens")), token_count(usage.get("completion_tokens")))
        return StreamEvent(text, chunk.get("model"), counts, finish)

    def parse_limits(self, headers: Any) -> RateLimits | None:
        """OpenAI's ``x-ratelimit-*`` headers."""
        return openai_limits(headers)
