"""Azure OpenAI: OpenAI's chat completions at an Azure resource, ``azure/<deployment>``.

Two URL shapes, as Azure offers them:

- the deployment URL (the default): ``{endpoint}/openai/deployments/{deployment}/chat/
  completions?api-version=VERSION``, where ``endpoint`` is the resource
  (``https://NAME.openai.azure.com``, $AZURE_OPENAI_ENDPOINT) and the model string's
  name is the deployment. The version comes from the endpoint's own ``?api-version=``
  query, else $OPENAI_API_VERSION (as the openai SDK reads it), else
  ``DEFAULT_API_VERSION``;
- the v1 URL: an endpoint ending in ``/openai/v1`` gets ``{endpoint}/chat/completions``
  with the deployment named in the body, and no version.

The key goes in an ``api-key`` header ($AZURE_OPENAI_API_KEY). Replies, streams, errors
and rate-limit headers are OpenAI's. Nothing here does I/O.
"""

from __future__ import annotations

import os
import urllib.parse

from rlm.errors import ConfigError
from rlm.providers.base import Request
from rlm.providers.openai_compat import OpenAICompatAdapter

__all__ = ["DEFAULT_API_VERSION", "AzureOpenAIAdapter"]

# Azure OpenAI's latest generally available data-plane version.
DEFAULT_API_VERSION = "2024-10-21"


class AzureOpenAIAdapter(OpenAICompatAdapter):
    """Chat completions on an Azure OpenAI resource (see the module docstring)."""

    name = "azure"
    key_env = "AZURE_OPENAI_API_KEY"
    base_url_env = "AZURE_OPENAI_ENDPOINT"
    default_base_url = ""

    def __init__(self, base_url: str | None, api_key: str) -> None:
        if not base_url:
            raise ConfigError("azure/ models need the resource's endpoint: set "
                              "AZURE_OPENAI_ENDPOINT or pass base_url=https://NAME.openai.azure.com")
        parts = urllib.parse.urlsplit(base_url)
        query = urllib.parse.parse_qs(parts.query)
        root = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        super().__init__(root, api_key)
        self.v1 = self.base_url.endswith("/openai/v1")
        self.api_version = (query.get("api-version") or [None])[0] or os.environ.get(
            "OPENAI_API_VERSION") or DEFAULT_API_VERSION
        self.resource = self.base_url.removesuffix("/openai")
        self._urls: dict[str, str] = {}

    def auth_headers(self, api_key: str) -> dict[str, str]:
        """Azure's ``api-key`` header."""
        return {"api-key": api_key}

    def url_for(self, request: Request) -> str:
        """The v1 URL, or the deployment URL of the request's model with its version."""
        if self.v1:
            return self.url
        deployment = request.model
        url = self._urls.get(deployment)
        if url is None:
            url = self._urls[deployment] = (
                f"{self.resource}/openai/deployments/{urllib.parse.quote(deployment, safe='')}"
                f"/chat/completions?api-version={urllib.parse.quote(self.api_version)}"
            )
        return url
