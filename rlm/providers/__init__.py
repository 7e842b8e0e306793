"""Provider adapters, one per wire format, and the registry that names them.

Each adapter (see ``rlm.providers.base.Adapter``) builds one provider's HTTP requests
and parses its replies, errors, streams and rate-limit headers; the client
(``rlm.llm``) keeps the one transport, pacing, retry, cache and usage layer for all of
them. Adding a provider is adding a module here and a line to ``_ADAPTERS``. This
package must not hold transport or retry logic.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from rlm.errors import ConfigError
from rlm.providers.base import Adapter, HTTPRequest, Reply, Request, StreamEvent
from rlm.providers.ratelimits import RateLimits

__all__ = [
    "Adapter",
    "HTTPRequest",
    "RateLimits",
    "Reply",
    "Request",
    "StreamEvent",
    "adapter_class",
    "check_endpoints",
    "endpoint_for",
    "provider_names",
    "qualified_model",
    "resolve_model",
]

DEFAULT_PROVIDER = "openai"

# Provider name -> "module:class", imported on first use so unused providers cost nothing.
_ADAPTERS: dict[str, str] = {
    "openai": "rlm.providers.openai_compat:OpenAICompatAdapter",
    "anthropic": "rlm.providers.anthropic:AnthropicAdapter",
    "azure": "rlm.providers.azure:AzureOpenAIAdapter",
    "gemini": "rlm.providers.gemini:GeminiAdapter",
}

# What an entry of ``endpoints=`` may set.
_ENDPOINT_KEYS = ("base_url", "api_key")


def provider_names() -> list[str]:
    """The names of the known providers."""
    return sorted(_ADAPTERS)


def adapter_class(name: str = DEFAULT_PROVIDER) -> type[Adapter]:
    """The adapter class of provider ``name``; ``ConfigError`` for an unknown name."""
    path = _ADAPTERS.get(name)
    if path is None:
        raise ConfigError(
            f"unknown provider {name!r}; use one of {', '.join(provider_names())}"
        )
    module, _, attr = path.partition(":")
    cls: type[Adapter] = getattr(importlib.import_module(module), attr)
    return cls


def resolve_model(model: str) -> tuple[str, str]:
    """The provider and the provider's own model name in a model string.

    ``"anthropic/claude-sonnet-4-5"`` is ``("anthropic", "claude-sonnet-4-5")``. Only the
    registered provider names are prefixes: ``"meta-llama/Llama-3"`` (a vLLM model) and
    ``"gpt-4o"`` are ``("openai", model)``, today's OpenAI-compatible behaviour. One
    prefix is taken off, so ``"openai/anthropic/claude-3.5-sonnet"`` sends
    ``"anthropic/claude-3.5-sonnet"`` to an OpenAI-compatible router such as OpenRouter.
    """
    prefix, slash, rest = model.partition("/")
    if slash and rest and prefix in _ADAPTERS:
        return prefix, rest
    return DEFAULT_PROVIDER, model


def qualified_model(provider: str, name: str) -> str:
    """The model string that resolves to ``provider`` and ``name`` (``resolve_model``'s
    inverse): a bare name for the default provider when it reads as one."""
    if provider == DEFAULT_PROVIDER and resolve_model(name) == (provider, name):
        return name
    return f"{provider}/{name}"


def check_endpoints(endpoints: Mapping[str, Any] | None) -> dict[str, dict[str, str]]:
    """``endpoints=`` checked: provider name to ``{"base_url": ..., "api_key": ...}`` (either
    may be left out; a plain string is a base URL). ``ConfigError`` says what is wrong."""
    if endpoints is None:
        return {}
    if not isinstance(endpoints, Mapping):
        raise ConfigError(
            "endpoints must be a dict of provider name to {'base_url': ..., 'api_key': ...}, "
            f"got {type(endpoints).__name__}"
        )
    out: dict[str, dict[str, str]] = {}
    for name, value in endpoints.items():
        if name not in _ADAPTERS:
            raise ConfigError(
                f"endpoints names an unknown provider {name!r}; use one of "
                f"{', '.join(provider_names())}"
            )
        if isinstance(value, str):
            value = {"base_url": value}
        if not isinstance(value, Mapping):
            raise ConfigError(f"endpoints[{name!r}] must be a base URL or a dict with "
                              f"base_url and/or api_key, got {type(value).__name__}")
        unknown = sorted(set(value) - set(_ENDPOINT_KEYS))
        if unknown:
            raise ConfigError(f"endpoints[{name!r}] has unknown keys {', '.join(unknown)}; "
                              "it takes base_url and api_key")
        entry: dict[str, str] = {}
        for key in _ENDPOINT_KEYS:
            item = value.get(key)
            if item is None:
                continue
            if not isinstance(item, str) or not item:
                raise ConfigError(f"endpoints[{name!r}][{key!r}] must be a non-empty str")
            entry[key] = item
        out[name] = entry
    return out


def endpoint_for(
    provider: str, *, root_provider: str, base_url: str | None, api_key: str | None,
    endpoints: Mapping[str, Mapping[str, str]],
) -> tuple[str | None, str | None]:
    """The (base URL, key) a client of ``provider`` is given in a run whose root model is
    on ``root_provider``: ``base_url``/``api_key`` belong to the root's provider (before
    its ``endpoints`` entry); another provider has only its ``endpoints`` entry. None
    leaves it to the provider's environment variables and default endpoint."""
    given = endpoints.get(provider) or {}
    if provider == root_provider:
        return base_url or given.get("base_url"), api_key or given.get("api_key")
    return given.get("base_url"), given.get("api_key")
