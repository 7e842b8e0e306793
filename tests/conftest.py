"""Shared fixtures: a fake OpenAI-compatible server on a real loopback socket."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rlm.testing import FakeLLMServer


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    """A FakeLLMServer with the echo responder, no latency, on its own thread."""
    with FakeLLMServer() as srv:
        yield srv


@pytest.fixture(autouse=True)
def _no_real_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests must never reach a real endpoint with a real key, whatever the shell has.
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("RLM_MODEL", raising=False)
