"""Shared fixtures: fake OpenAI-compatible servers on real loopback sockets, and teardown."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_support import haystack, scripts, sub_model

from rlm import RLM
from rlm.testing import FakeLLMServer


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    """A FakeLLMServer with the echo responder, no latency, on its own thread."""
    with FakeLLMServer() as srv:
        yield srv


@pytest.fixture
def closing() -> Iterator[list[RLM]]:
    """A list of RLMs (append, or pass to ``make_rlm``) whose clients are closed at teardown."""
    made: list[RLM] = []
    yield made
    for r in made:
        r.client.close_sync()
        r.sub_client.close_sync()


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeLLMServer]:
    """The server tests' upstream: scripted roots and the chunk-reading sub-model (serve_support)."""
    with FakeLLMServer(sub_model, scripts=scripts()) as srv:
        yield srv


@pytest.fixture(scope="module")
def allowed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An allowed directory for server tests, holding the haystack as ``log.txt``."""
    root = tmp_path_factory.mktemp("allowed")
    (root / "log.txt").write_text(haystack(), encoding="utf-8")
    return root


@pytest.fixture(autouse=True)
def _no_real_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests must never reach a real endpoint with a real key, whatever the shell has.
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL",
                 "AZURE_OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT", "OPENAI_API_VERSION",
                 "GEMINI_API_KEY", "GEMINI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("RLM_MODEL", raising=False)
