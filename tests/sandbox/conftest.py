"""Fixtures for the sandbox suites: one env per test, for every sandbox in SANDBOXES.

The client of each env holds a canary API key and the process environment holds the
same canary as OPENAI_API_KEY, so a test can check the key shows up in no output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rlm import AsyncOpenAIClient, REPLEnv
from rlm.loop import run_sync
from rlm.testing import FakeLLMServer

# The sandboxes both suites run against.
SANDBOXES = ["local", "process"]

SECRET = "sk-canary-7f3a9c1e5b2d4680-do-not-leak"


@pytest.fixture(params=SANDBOXES)
def sandbox(request: pytest.FixtureRequest) -> str:
    """The sandbox kind under test."""
    return request.param


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    """A fake API key set in the environment and held by the env's client."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    return SECRET


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeLLMServer]:
    """One echo server for a test module (requests are independent)."""
    with FakeLLMServer() as srv:
        yield srv


@pytest.fixture
def make_env(
    sandbox: str, secret: str, fake_server: FakeLLMServer
) -> Iterator[Callable[..., REPLEnv]]:
    """Factory for envs on a client holding the canary key; all are closed afterwards."""
    envs: list[REPLEnv] = []
    clients: list[AsyncOpenAIClient] = []

    def make(context: object = "the context", timeout: float = 1.0, **kwargs: object) -> REPLEnv:
        client = AsyncOpenAIClient(model="fake-model", api_key=secret, base_url=fake_server.url)
        clients.append(client)
        env = REPLEnv(context=context, client=client, sandbox=sandbox, timeout=timeout, **kwargs)
        envs.append(env)
        return env

    yield make
    for env in envs:
        env.close()
    for client in clients:
        run_sync(client.close())


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    """A path that no payload may create."""
    return tmp_path / "pwned.txt"
