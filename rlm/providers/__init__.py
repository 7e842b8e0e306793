"""Provider adapters, one per wire format, and the registry that names them.

Each adapter (see ``rlm.providers.base.Adapter``) builds one provider's HTTP requests
and parses its replies, errors, streams and rate-limit headers; the client
(``rlm.llm``) keeps the one transport, pacing, retry, cache and usage layer for all of
them. Adding a provider is adding a module here and a line to ``_ADAPTERS``. This
package must not hold transport or retry logic.
"""

from __future__ import annotations

import importlib

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
    "provider_names",
]

DEFAULT_PROVIDER = "openai"

# Provider name -> "module:class", imported on first use so unused providers cost nothing.
_ADAPTERS: dict[str, str] = {
    "openai": "rlm.providers.openai_compat:OpenAICompatAdapter",
}


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
