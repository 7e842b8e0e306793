"""Fixtures for the fake server's own tests: the official openai SDK pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest

from rlm.testing import FakeLLMServer


@pytest.fixture
async def sdk(server: FakeLLMServer) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official SDK on its aiohttp transport, without retries so faults surface."""
    client = openai.AsyncOpenAI(
        base_url=server.url, api_key="x", max_retries=0,
        http_client=openai.DefaultAioHttpClient(),
    )
    async with client:
        yield client
