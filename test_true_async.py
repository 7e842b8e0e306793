"""Proof of rlm's async claims, against a real OpenAI-compatible server on loopback.

Part 1: basic async completion and batch. Part 2: the same N prompts run sequentially,
through a thread-pool executor ("fake async") and truly async; concurrency is proven by
the server's peak in-flight count (1, the pool size, N), not by wall time, which is
printed as a table for the reader (run with ``pytest -s test_true_async.py``). Part 3:
REPL integration: a cell's ``llm_query_batch`` fans out just the same.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Iterator

import pytest

from rlm import AsyncOpenAIClient
from rlm.loop import run_sync
from rlm.testing import FakeLLMServer

N = 40
POOL = 8
LATENCY = 0.2


@pytest.fixture(scope="module")
def slow_server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(latency=LATENCY) as srv:
        yield srv


@pytest.fixture
def client(slow_server: FakeLLMServer) -> Iterator[AsyncOpenAIClient]:
    slow_server.reset_counters()
    c = AsyncOpenAIClient(model="fake-model", api_key="k", base_url=slow_server.url, max_concurrency=N)
    yield c
    c.close_sync()


# -- part 1: basic async ------------------------------------------------------------------


async def test_async_completion(client: AsyncOpenAIClient) -> None:
    assert await client.completion("ECHO hello") == "hello"


async def test_async_batch_keeps_order(client: AsyncOpenAIClient) -> None:
    prompts = [f"ECHO {i}" for i in range(N)]
    assert await client.completion_batch(prompts) == [str(i) for i in range(N)]


# -- part 2: sequential vs thread-pool vs truly async -------------------------------------

_timings: dict[str, tuple[float, int]] = {}


def _record(name: str, seconds: float, peak: int) -> None:
    _timings[name] = (seconds, peak)
    if len(_timings) == 3:
        print(f"\n{N} prompts at {LATENCY} s simulated latency")
        print(f"{'mode':<24}{'wall s':>8}{'peak in flight':>16}")
        for mode, (wall, pk) in _timings.items():
            print(f"{mode:<24}{wall:>8.2f}{pk:>16}")


def test_sequential_has_one_request_in_flight(client: AsyncOpenAIClient, slow_server: FakeLLMServer) -> None:
    prompts = [f"ECHO {i}" for i in range(10)]
    start = time.perf_counter()
    out = [run_sync(client.completion(p)) for p in prompts]
    _record("sequential (10 only)", time.perf_counter() - start, slow_server.peak_in_flight)
    assert out == [str(i) for i in range(10)]
    assert slow_server.peak_in_flight == 1


def test_thread_pool_is_capped_at_the_pool_size(client: AsyncOpenAIClient, slow_server: FakeLLMServer) -> None:
    prompts = [f"ECHO {i}" for i in range(N)]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=POOL) as pool:
        out = list(pool.map(lambda p: run_sync(client.completion(p)), prompts))
    _record(f"thread pool ({POOL})", time.perf_counter() - start, slow_server.peak_in_flight)
    assert out == [str(i) for i in range(N)]
    assert slow_server.peak_in_flight == POOL


async def test_true_async_has_all_requests_in_flight(client: AsyncOpenAIClient, slow_server: FakeLLMServer) -> None:
    prompts = [f"ECHO {i}" for i in range(N)]
    start = time.perf_counter()
    out = await client.completion_batch(prompts)
    _record("truly async", time.perf_counter() - start, slow_server.peak_in_flight)
    assert out == [str(i) for i in range(N)]
    assert slow_server.peak_in_flight == N


async def test_gathered_single_calls_also_overlap(client: AsyncOpenAIClient, slow_server: FakeLLMServer) -> None:
    out = await asyncio.gather(*(client.completion(f"ECHO {i}") for i in range(N)))
    assert list(out) == [str(i) for i in range(N)]
    assert slow_server.peak_in_flight == N


# -- part 3: REPL integration ---------------------------------------------------------------

REPL_CHUNKS = 100
REPL_LATENCY = 0.3


@pytest.fixture
def repl_server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(latency=REPL_LATENCY) as srv:
        yield srv


@pytest.fixture
def repl_client(repl_server: FakeLLMServer) -> Iterator[AsyncOpenAIClient]:
    c = AsyncOpenAIClient(
        model="fake-model", api_key="k", base_url=repl_server.url, max_concurrency=REPL_CHUNKS
    )
    yield c
    c.close_sync()


_SPLIT = "chunks = [context[i:i + 1000] for i in range(0, len(context), 1000)]\n"


def test_repl_cell_batch_has_every_chunk_in_flight(
    repl_client: AsyncOpenAIClient, repl_server: FakeLLMServer
) -> None:
    from rlm import REPLEnv

    with REPLEnv(context="x" * (REPL_CHUNKS * 1000), client=repl_client) as env:
        r = env.execute(
            _SPLIT
            + "answers = llm_query_batch([f'ECHO {i}' for i, c in enumerate(chunks)])\n"
            "print(len(chunks), answers[:3], answers[-1])"
        )
    assert r.error is None, r.error
    assert r.stdout == f"{REPL_CHUNKS} ['0', '1', '2'] {REPL_CHUNKS - 1}\n"
    assert r.sub_calls == REPL_CHUNKS
    assert repl_server.peak_in_flight == REPL_CHUNKS


async def test_repl_cell_async_batch_has_every_chunk_in_flight(
    repl_client: AsyncOpenAIClient, repl_server: FakeLLMServer
) -> None:
    from rlm import REPLEnv

    with REPLEnv(context="y" * (REPL_CHUNKS * 1000), client=repl_client) as env:
        r = await env.aexecute(
            _SPLIT
            + "answers = await llm_query_batch_async([f'ECHO {i}' for i in range(len(chunks))])\n"
            "print(len(answers), answers[-1])"
        )
    assert r.error is None, r.error
    assert r.stdout == f"{REPL_CHUNKS} {REPL_CHUNKS - 1}\n"
    assert r.sub_calls == REPL_CHUNKS
    assert repl_server.peak_in_flight == REPL_CHUNKS
