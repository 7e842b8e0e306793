"""The engine loop and the sync bridge: any thread, inside a running loop, never on itself."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading

import pytest

from rlm import AsyncOpenAIClient
from rlm.errors import LoopError
from rlm.loop import engine_loop, in_engine_thread, run_sync
from rlm.testing import FakeLLMServer


def test_run_sync_from_a_plain_thread(server: FakeLLMServer) -> None:
    client = AsyncOpenAIClient(model="m", api_key="k", base_url=server.url)
    results: list[str] = []

    def work() -> None:
        results.append(run_sync(client.completion("ECHO from a thread")))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["from a thread"] * 4
    client.close_sync()


async def test_run_sync_inside_a_running_loop(server: FakeLLMServer) -> None:
    # A Jupyter cell or a web handler: this thread's own loop is running right now.
    assert asyncio.get_running_loop().is_running()
    client = AsyncOpenAIClient(model="m", api_key="k", base_url=server.url)
    assert run_sync(client.completion_batch(["ECHO a", "ECHO b"])) == ["a", "b"]
    # and the same client is awaitable from this loop afterwards
    assert await client.completion("ECHO c") == "c"
    await client.close()


def test_run_sync_on_the_engine_thread_is_refused() -> None:
    async def probe() -> str:
        assert in_engine_thread()

        async def inner() -> int:
            return 1

        try:
            run_sync(inner())
        except LoopError as exc:
            return str(exc)
        return "no error"

    message = run_sync(probe())
    assert "deadlock" in message
    assert "await" in message


def test_the_engine_loop_is_one_long_lived_loop() -> None:
    first = engine_loop()
    run_sync(asyncio.sleep(0))
    assert engine_loop() is first
    assert first.is_running()


def test_a_cancelled_wait_cancels_the_work() -> None:
    started = threading.Event()
    cancelled = threading.Event()

    async def slow() -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError):
        run_sync(slow(), timeout=0.2)
    assert started.is_set()
    assert cancelled.wait(5)


def test_interpreter_exit_is_clean_without_close(server: FakeLLMServer) -> None:
    script = textwrap.dedent(
        f"""
        import warnings
        warnings.simplefilter("always")
        from rlm import AsyncOpenAIClient
        from rlm.loop import run_sync
        client = AsyncOpenAIClient(model="m", api_key="k", base_url={server.url!r})
        print(run_sync(client.completion_batch(["ECHO 1", "ECHO 2"])))
        # no close(): the engine loop's exit hook must close the pool quietly
        """
    )
    proc = subprocess.run(
        [sys.executable, "-W", "always", "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['1', '2']"
    assert "Event loop is closed" not in proc.stderr
    assert "Unclosed" not in proc.stderr
    assert proc.stderr.strip() == ""
