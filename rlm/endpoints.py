"""The root and sub clients of a run: which provider, endpoint and key each model gets.

A run names two models, each possibly with a provider prefix
(``anthropic/claude-sonnet-4-5`` root, ``openai/gpt-5-mini`` sub). ``base_url`` and
``api_key`` belong to the root model's provider; a sub model on another provider gets
its entry of ``endpoints`` (``{"openai": {"base_url": ..., "api_key": ...}}``), else that
provider's environment variables and default endpoint. ``RLM`` and the servers' query
runner build their clients here, so the rule lives once. The parsing of model strings
is ``rlm.providers.resolve_model``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from rlm.errors import ConfigError
from rlm.llm import DEFAULT_MODEL, AsyncOpenAIClient
from rlm.providers import endpoint_for, qualified_model, resolve_model

__all__ = ["root_client", "sub_client_for"]


def root_client(model: str | None, *, base_url: str | None, api_key: str | None,
                endpoints: Mapping[str, Mapping[str, str]], **options: Any) -> AsyncOpenAIClient:
    """The client of root model ``model`` (None: $RLM_MODEL, else the default model):
    its provider's endpoint and key from ``base_url``/``api_key``, else its entry of
    ``endpoints``, else the environment. ``options`` go to the client."""
    provider, _ = resolve_model(model or os.environ.get("RLM_MODEL") or DEFAULT_MODEL)
    url, key = endpoint_for(provider, root_provider=provider, base_url=base_url,
                            api_key=api_key, endpoints=endpoints)
    return AsyncOpenAIClient(model=model, api_key=key, base_url=url, **options)


def sub_client_for(root: AsyncOpenAIClient, recursive_model: str | None, *,
                   base_url: str | None, api_key: str | None,
                   endpoints: Mapping[str, Mapping[str, str]],
                   **options: Any) -> AsyncOpenAIClient:
    """The client of sub model ``recursive_model`` (None: the root's model) in a run whose
    root client is ``root``: on the root's provider it shares the root's endpoint and
    key; on another provider it takes that provider's ``endpoints`` entry, else the
    environment. Its key is checked now: ``ConfigError`` says how to give one."""
    model = recursive_model or qualified_model(root.provider, root.model)
    provider, _ = resolve_model(model)
    same = provider == root.provider
    url, key = endpoint_for(provider, root_provider=root.provider,
                            base_url=base_url or (root.base_url if same else None),
                            api_key=api_key, endpoints=endpoints)
    client = AsyncOpenAIClient(model=model, api_key=key, base_url=url, **options)
    try:
        client.check_key()
    except ConfigError as exc:
        if same:
            raise
        raise ConfigError(
            f"the sub model is on {provider}/: {exc}; or give it with "
            f"endpoints={{{provider!r}: {{'api_key': ..., 'base_url': ...}}}}"
        ) from None
    return client
