"""Gemini through Google's OpenAI-compatible endpoint, ``gemini/<model>``.

``POST https://generativelanguage.googleapis.com/v1beta/openai/chat/completions`` with
``Authorization: Bearer $GEMINI_API_KEY`` ($GEMINI_BASE_URL moves it). The format is
OpenAI's, with its quirks handled here or in the client:

- a stream carries the running usage on every chunk, not once at the end: the client
  keeps the largest of each side (``rlm.llm``), so it is counted once, not summed;
- the model in a reply may read ``models/gemini-...``: the prefix is dropped, so usage
  and prices use the name the model was asked by;
- no OpenAI organisation or project headers are sent to Google.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rlm.providers.base import Reply, Request, StreamEvent
from rlm.providers.openai_compat import OpenAICompatAdapter

__all__ = ["GeminiAdapter"]


class GeminiAdapter(OpenAICompatAdapter):
    """Gemini's OpenAI-compatible chat completions (see the module docstring)."""

    name = "gemini"
    key_env = "GEMINI_API_KEY"
    base_url_env = "GEMINI_BASE_URL"
    default_base_url = "https://generativelanguage.googleapis.com/v1beta/openai"

    def auth_headers(self, api_key: str) -> dict[str, str]:
        """A Bearer key, and nothing of OpenAI's organisation headers."""
        return {"Authorization": f"Bearer {api_key}"}

    def parse_reply(self, data: Any, request: Request) -> Reply:
        """As OpenAI's, the model's ``models/`` prefix dropped."""
        reply = super().parse_reply(data, request)
        if reply.model.startswith("models/"):
            reply = dataclasses.replace(reply, model=reply.model.removeprefix("models/"))
        return reply

    def parse_stream_event(self, event: str, data: str) -> StreamEvent | None:
        """As OpenAI's, the model's ``models/`` prefix dropped."""
        parsed = super().parse_stream_event(event, data)
        if parsed is not None and parsed.model and parsed.model.startswith("models/"):
            parsed = dataclasses.replace(parsed, model=parsed.model.removeprefix("models/"))
        return parsed
