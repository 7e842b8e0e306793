"""The fake model: who answers a normalised chat request, and what it costs in tokens.

Holds :class:`ChatCall` (a chat request once its protocol's shape is stripped: OpenAI
chat completions and Anthropic Messages both become one), :class:`Answer` and
:class:`Refusal` (what the model gives back), and :class:`FakeModel`, which picks the
script, the responder or the JSON responder and counts tokens the fake's way
(characters / 4). It must not hold HTTP, wire formats, rate limits or counters.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlm.testing.faults import Fault
from rlm.testing.responders import (
    JSONResponder,
    Responder,
    ScriptItem,
    echo_responder,
    text_of,
)

__all__ = ["Answer", "ChatCall", "FakeModel", "Refusal", "tokens"]


def tokens(chars: int) -> int:
    """The fake's token count for ``chars`` characters: cheap and deterministic on purpose,
    so tests can assert exact usage totals."""
    return max(1, chars // 4)


@dataclass
class ChatCall:
    """One chat request in the protocol-neutral shape responders and limits see.

    ``messages`` are in OpenAI's shape (an Anthropic ``system`` becomes the first
    message); ``response_format`` is OpenAI's (an Anthropic or OpenAI forced tool call
    becomes a ``json_schema`` one, with ``tool`` naming the tool); ``max_tokens`` is what
    the request allows for the reply (None when it does not say); ``prompt_chars`` counts
    the characters of every message's text, which the token counts derive from.
    """

    protocol: str
    model: str
    messages: list[dict[str, Any]]
    stream: bool = False
    response_format: dict[str, Any] | None = None
    tool: str | None = None
    max_tokens: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    prompt_chars: int = 0
    # Anthropic's prompt as (block text, has cache_control) in its order: tools, system,
    # messages; None on protocols without explicit breakpoints.
    cache_blocks: list[tuple[str, bool]] | None = None
    # The messages as the request sent them, when ``messages`` had to be normalised.
    sent_messages: list[Any] | None = None
    # The usage object the reply reported, set by the wire that rendered it (Anthropic's
    # with its cache reads and writes), for the request log.
    usage: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.prompt_chars:
            self.prompt_chars = sum(
                len(text_of(m.get("content"))) for m in self.messages if isinstance(m, dict)
            )

    @property
    def prompt_tokens(self) -> int:
        """The prompt's size in the fake's tokens."""
        return tokens(self.prompt_chars)


@dataclass
class Answer:
    """What the model replies: ``text`` (for a tool call, the JSON text of its input),
    ``tool_input`` when the request forced a tool, and the usage to report."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    tool_input: dict[str, Any] | None = None
    cached_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(frozen=True)
class Refusal:
    """An error the model's side reports instead of an answer (a responder that raised, a
    ``response_format`` the server does not support): rendered in the protocol's error
    shape with ``status``."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None


class FakeModel:
    """Answers chat calls: a model named in ``scripts`` from its script (indexed by how many
    assistant messages the call carries; past the end, the last item), a structured call
    through ``json_responder`` when one is given, anything else through ``responder``.
    With ``response_format=False`` structured calls are refused like a server without
    JSON-schema support. ``reasoning`` maps model names to the reasoning tokens each of
    their replies reports (counted in the completion tokens, as OpenAI does).
    """

    def __init__(
        self,
        responder: Responder | None = None,
        *,
        scripts: Mapping[str, Sequence[ScriptItem]] | None = None,
        json_responder: JSONResponder | None = None,
        response_format: bool = True,
        reasoning: Mapping[str, int] | None = None,
    ) -> None:
        self.responder: Responder = responder if responder is not None else echo_responder
        self.json_responder = json_responder
        self.response_format = response_format
        self.scripts: dict[str, tuple[ScriptItem, ...]] = {}
        for name, items in (scripts or {}).items():
            if isinstance(items, str) or not items:
                raise ValueError(f"script for model {name!r} must be a non-empty list of turns")
            self.scripts[name] = tuple(items)
        self.reasoning: dict[str, int] = dict(reasoning or {})
        for name, count in self.reasoning.items():
            if count < 0:
                raise ValueError(f"reasoning tokens for {name!r} must be >= 0")

    def reply(self, call: ChatCall) -> Any:
        """What the responder, script or JSON responder returns for ``call``, unconverted: a
        str, a JSON value, a Fault, or a :class:`Refusal`; an exception a responder raised
        comes back as a Refusal naming it (a broken responder is a bug in the test, which
        the client must see)."""
        if call.response_format is not None and not self.response_format:
            kind = call.response_format.get("type")
            return Refusal(
                400,
                f"Invalid parameter: 'response_format' of type {kind!r} is not supported "
                "with this model (simulated by FakeLLMServer).",
                param="response_format",
            )
        try:
            script = self.scripts.get(call.model)
            if script is not None:
                turn = sum(
                    1 for m in call.messages if isinstance(m, dict) and m.get("role") == "assistant"
                )
                item = script[min(turn, len(script) - 1)]
                return item(call.messages) if callable(item) else item
            if call.response_format is not None and self.json_responder is not None:
                return self.json_responder(call.messages, call.response_format)
            return self.responder(call.messages)
        except Exception as exc:
            return Refusal(
                500,
                f"responder raised {type(exc).__name__}: {exc}",
                type="server_error",
                code="responder_error",
            )

    def answer(self, call: ChatCall) -> Answer | Fault | Refusal:
        """The reply to ``call`` as an :class:`Answer` with its usage, or the Fault or
        Refusal it turned out to be."""
        return self.settle(call, self.reply(call))

    def settle(self, call: ChatCall, reply: Any) -> Answer | Fault | Refusal:
        """Turn a responder's raw ``reply`` into an :class:`Answer` (with usage), or pass a
        Fault or Refusal through; a value of the wrong type becomes a Refusal."""
        if isinstance(reply, (Fault, Refusal)):
            return reply
        if isinstance(reply, (dict, list, int, float)):
            reply = json.dumps(reply, ensure_ascii=False)
        if not isinstance(reply, str):
            return Refusal(
                500,
                f"responder returned {type(reply).__name__}; it must return str, Fault or "
                "a JSON value",
                type="server_error",
                code="responder_error",
            )
        tool_input: dict[str, Any] | None = None
        if call.tool is not None:
            try:
                value = json.loads(reply)
            except ValueError:
                value = None
            if not isinstance(value, dict):
                return Refusal(
                    500,
                    f"the request forces the tool {call.tool!r}, so the responder must return "
                    f"a JSON object (its input); it returned {reply[:80]!r}",
                    type="server_error",
                    code="responder_error",
                )
            tool_input = value
        reasoning = self.reasoning.get(call.model, 0)
        return Answer(
            text=reply,
            prompt_tokens=call.prompt_tokens,
            completion_tokens=tokens(len(reply)) + reasoning,
            tool_input=tool_input,
            reasoning_tokens=reasoning,
        )
