"""One env cannot flood the host: per-env caps on sub-queries, in both sandboxes.

A batch of a million prompts and a 40 MB prompt are refused in the cell with an error
that names the limit and the option to change it, before anything reaches the model
server, while a second env's calls keep working. A batch bigger than ``max_in_flight``
is fed to the server as slots free up; single queries past the cap fail clearly. The
process sandbox's host checks the same caps again, for a worker that skips its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from rlm import AsyncOpenAIClient, REPLEnv
from rlm.errors import ConfigError
from rlm.loop import run_sync
from rlm.sandbox.process import ProcessExecutor
from rlm.testing import FakeLLMServer

MakeEnv = Callable[..., REPLEnv]


def _alongside(flood: REPLEnv, code: str, other: REPLEnv) -> tuple[str | None, str]:
    """Run ``code`` in ``flood`` while ``other`` makes a sub-query; (flood error, other's reply)."""
    results: dict[str, object] = {}

    def run_flood() -> None:
        results["flood"] = flood.execute(code)

    thread = threading.Thread(target=run_flood)
    thread.start()
    reply = other.execute("print(llm_query('ECHO neighbour ok'))")
    thread.join()
    assert reply.error is None, reply.error
    flood_result = results["flood"]
    return flood_result.error, reply.stdout  # type: ignore[attr-defined]


def test_a_million_prompts_are_refused_naming_the_option(
    make_env: MakeEnv, fake_server: FakeLLMServer
) -> None:
    flood, other = make_env(timeout=30.0), make_env(timeout=30.0)
    before = fake_server.requests
    error, reply = _alongside(flood, "r = llm_query_batch(['x'] * 10**6)", other)
    assert error is not None
    assert "1,000,000 prompts" in error and "max_batch_items" in error
    assert reply == "neighbour ok\n"
    assert fake_server.requests == before + 1  # only the neighbour's
    assert flood.execute("print(llm_query('ECHO still here'))").stdout == "still here\n"


def test_a_forty_megabyte_prompt_is_refused_naming_the_option(
    make_env: MakeEnv, fake_server: FakeLLMServer
) -> None:
    flood, other = make_env(timeout=30.0), make_env(timeout=30.0)
    before = fake_server.requests
    error, reply = _alongside(flood, "r = llm_query('x' * (40 << 20))", other)
    assert error is not None
    assert "41,943,040 bytes" in error and "max_prompt_bytes" in error
    assert reply == "neighbour ok\n"
    batch = flood.execute("r = llm_query_batch(['ECHO a', 'x' * (40 << 20)])")
    assert batch.error is not None and "prompt 1 is" in batch.error
    assert fake_server.requests == before + 1


def test_the_caps_are_options_of_the_env(make_env: MakeEnv) -> None:
    env = make_env(timeout=30.0, max_batch_items=10, max_prompt_bytes=100)
    assert env.execute("r = llm_query_batch(['ECHO x'] * 10)\nprint(len(r))").stdout == "10\n"
    over = env.execute("r = llm_query_batch(['ECHO x'] * 11)")
    assert over.error is not None and "at most 10 per call (max_batch_items)" in over.error
    assert env.execute("print(llm_query('ECHO ' + 'y' * 95))").error is None
    big = env.execute("llm_query('ECHO ' + 'y' * 96)")
    assert big.error is not None and "at most 100 bytes per prompt" in big.error


def test_a_non_ascii_prompt_is_measured_in_utf8_bytes(make_env: MakeEnv) -> None:
    env = make_env(timeout=30.0, max_prompt_bytes=100)
    # 40 characters, 120 bytes.
    r = env.execute("llm_query('\u20ac' * 40)")
    assert r.error is not None and "120 bytes" in r.error


@pytest.mark.parametrize("value", [0, -1, 1.5, "10", True])
def test_a_bad_cap_is_a_config_error(value: object) -> None:
    with pytest.raises(ConfigError, match="max_in_flight must be a positive int"):
        REPLEnv(max_in_flight=value)  # type: ignore[arg-type]


@pytest.fixture
def slow_server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(latency=0.05) as srv:
        yield srv


@pytest.fixture
def slow_env(sandbox: str, slow_server: FakeLLMServer) -> Iterator[Callable[..., REPLEnv]]:
    made: list[tuple[REPLEnv, AsyncOpenAIClient]] = []

    def make(**kwargs: object) -> REPLEnv:
        client = AsyncOpenAIClient(
            model="fake-model", api_key="sk-test", base_url=slow_server.url, max_concurrency=64
        )
        env = REPLEnv("ctx", client=client, sandbox=sandbox, timeout=60.0, **kwargs)
        made.append((env, client))
        return env

    yield make
    for env, client in made:
        env.close()
        run_sync(client.close())


def test_a_batch_bigger_than_max_in_flight_is_fed_in_as_slots_free(
    slow_env: Callable[..., REPLEnv], slow_server: FakeLLMServer
) -> None:
    env = slow_env(max_in_flight=4)
    r = env.execute("rs = llm_query_batch([f'ECHO {i}' for i in range(40)])\nprint(rs == [str(i) for i in range(40)])")
    assert r.error is None, r.error
    assert r.stdout == "True\n"
    assert r.sub_calls == 40
    assert 1 <= slow_server.peak_in_flight <= 4


def test_concurrent_batches_of_one_env_share_its_slots(
    slow_env: Callable[..., REPLEnv], slow_server: FakeLLMServer
) -> None:
    env = slow_env(max_in_flight=6)
    r = env.execute(
        "import asyncio\n"
        "parts = await asyncio.gather(*[\n"
        "    llm_query_batch_async([f'ECHO {b}-{i}' for i in range(10)]) for b in range(4)])\n"
        "print(all(p == [f'{b}-{i}' for i in range(10)] for b, p in enumerate(parts)))\n"
    )
    assert r.error is None, r.error
    assert r.stdout == "True\n"
    assert slow_server.peak_in_flight <= 6


def test_single_queries_past_twice_max_in_flight_fail_naming_the_option(
    slow_env: Callable[..., REPLEnv],
) -> None:
    env = slow_env(max_in_flight=2)
    r = env.execute(
        "import asyncio\n"
        "out = await asyncio.gather(*[llm_query_async(f'ECHO {i}') for i in range(10)],\n"
        "                           return_exceptions=True)\n"
        "ok = [o for o in out if isinstance(o, str)]\n"
        "bad = [str(o) for o in out if not isinstance(o, str)]\n"
        "print(len(ok), len(bad))\n"
        "print(bad[0])\n"
    )
    assert r.error is None, r.error
    counts, message = r.stdout.splitlines()[:2]
    assert counts == "4 6"
    assert "max_in_flight=2" in message and "llm_query_batch" in message


# -- the host checks again (process sandbox, a worker that skips its own checks) ------


def test_the_host_refuses_a_huge_batch_announced_by_a_hostile_worker(
    fake_server: FakeLLMServer,
) -> None:
    client = AsyncOpenAIClient(model="fake-model", api_key="sk-test", base_url=fake_server.url)
    gate_env = REPLEnv("ctx", client=client, sandbox="process", max_batch_items=100)
    executor = gate_env.executor
    assert isinstance(executor, ProcessExecutor)
    before = fake_server.requests
    try:
        raw = ProcessExecutor(sub_queries=executor._sub_queries, _allow_raw=True)
        try:
            got = raw._run_raw(
                "import gc\n"
                "worker = next(o for o in gc.get_objects() if type(o).__name__ == 'WorkerChannel')\n"
                "future = worker._submit('batch', None, {'n': 10**6, 'params': {}})\n"
                "try:\n"
                "    future.result(timeout=20)\n"
                "except Exception as exc:\n"
                "    result = str(exc)\n"
            )
        finally:
            raw.close()
        assert isinstance(got.value, str), got
        assert "1,000,000 prompts" in got.value and "max_batch_items" in got.value
        assert fake_server.requests == before
    finally:
        gate_env.close()
        run_sync(client.close())


def test_failed_batches_give_their_slots_back(sandbox: str) -> None:
    # Without a client every slice fails at once; slices queued behind the first one are
    # cancelled before they start. Their room must come back, or after a few batches
    # every later llm_query_batch of the env waits for slots forever.
    with REPLEnv(context="c", sandbox=sandbox, timeout=10.0, max_in_flight=8) as env:
        for _ in range(6):
            r = env.execute(
                "try:\n    llm_query_batch(['ECHO %d' % i for i in range(1000)])\n"
                "except LLMQueryError as e:\n    print('refused:', e)"
            )
            assert r.error is None, r.error
            assert r.stdout.startswith("refused: no model client")
