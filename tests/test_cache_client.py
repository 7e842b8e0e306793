"""The cache and single-flight through AsyncOpenAIClient, REPLEnv and RLM, on a real server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from rlm import RLM, AsyncOpenAIClient, REPLEnv
from rlm.cache import SQLiteCache, cache_info, request_key
from rlm.errors import ConfigError, LLMError
from rlm.loop import run_sync
from rlm.testing import FakeLLMServer


def make_client(srv: FakeLLMServer, **kw: object) -> AsyncOpenAIClient:
    return AsyncOpenAIClient(model="fake-model", api_key="k", base_url=srv.url, **kw)  # type: ignore[arg-type]


# -- single-flight ---------------------------------------------------------------------


async def test_identical_requests_in_one_batch_are_sent_once() -> None:
    with FakeLLMServer(latency=0.05) as srv:
        async with make_client(srv) as client:
            prompts = ["ECHO left" if i % 2 else "ECHO right" for i in range(200)]
            out = await client.completion_batch(prompts)
            usage = client.usage
    assert out == [p[5:] for p in prompts]
    assert srv.requests == 2
    assert (usage.calls, usage.cached_calls) == (2, 198)


async def test_identical_single_calls_in_flight_together_are_sent_once() -> None:
    with FakeLLMServer(latency=0.1) as srv:
        async with make_client(srv) as client:
            out = await asyncio.gather(*(client.completion("ECHO same") for _ in range(20)))
    assert out == ["same"] * 20
    assert srv.requests == 1


def test_envs_sharing_a_client_share_one_request(tmp_path: Path) -> None:
    with FakeLLMServer(latency=0.3) as srv:
        client = make_client(srv)
        envs = [REPLEnv(context="x", client=client) for _ in range(3)]

        async def ask_all() -> list[str]:
            runs = [env.aexecute("r = await llm_query_async('ECHO shared')\nprint(r)") for env in envs]
            return [r.stdout.strip() for r in await asyncio.gather(*runs)]

        try:
            assert run_sync(ask_all()) == ["shared"] * 3
        finally:
            for env in envs:
                env.close()
            client.close_sync()
    assert srv.requests == 1


async def test_cache_false_asks_afresh_each_time() -> None:
    with FakeLLMServer(latency=0.05) as srv:
        async with make_client(srv) as client:
            await client.completion_batch(["ECHO s"] * 5, cache=False)
    assert srv.requests == 5


async def test_cache_read_false_without_a_store_is_the_plain_client() -> None:
    with FakeLLMServer(latency=0.05) as srv:
        async with make_client(srv, cache_read=False) as client:
            await client.completion_batch(["ECHO s"] * 5)
    assert srv.requests == 5


# -- the persistent store ----------------------------------------------------------------


async def test_a_second_client_on_the_same_directory_sends_nothing(tmp_path: Path) -> None:
    prompts = [f"ECHO item {i}" for i in range(50)]
    with FakeLLMServer() as srv:
        async with make_client(srv, cache=tmp_path, prices={"fake-model": (1.0, 2.0)}) as first:
            expected = await first.completion_batch(prompts)
            assert await first.completion("ECHO single") == "single"
        sent = srv.requests
        async with make_client(srv, cache=tmp_path, prices={"fake-model": (1.0, 2.0)}) as again:
            assert await again.completion_batch(prompts) == expected
            assert await again.completion("ECHO single") == "single"
            usage = again.usage
        assert srv.requests == sent
    assert (usage.calls, usage.cached_calls) == (0, 51)
    assert usage.saved_tokens > 0 and usage.saved_usd > 0
    assert usage.by_model["fake-model"].cached_calls == 51
    assert cache_info(tmp_path).entries == 51


async def test_a_changed_parameter_misses(tmp_path: Path) -> None:
    with FakeLLMServer() as srv:
        async with make_client(srv, cache=tmp_path) as client:
            await client.completion("ECHO q", temperature=0)
            await client.completion("ECHO q", temperature=0)
            assert srv.requests == 1
            await client.completion("ECHO q", temperature=0.5)
            await client.completion("ECHO q", temperature=0, max_tokens=5)
            await client.completion([{"role": "system", "content": "x"},
                                     {"role": "user", "content": "ECHO q"}], temperature=0)
    assert srv.requests == 4


async def test_a_cached_reply_is_returned_even_at_high_temperature(tmp_path: Path) -> None:
    with FakeLLMServer() as srv:
        async with make_client(srv, cache=tmp_path) as client:
            first = await client.completion("ECHO hot", temperature=1.5)
            assert await client.completion("ECHO hot", temperature=1.5) == first
            assert await client.completion("ECHO hot", temperature=1.5, cache=False) == first
    assert srv.requests == 2


async def test_cache_write_false_reads_but_stores_nothing(tmp_path: Path) -> None:
    with FakeLLMServer() as srv:
        async with make_client(srv, cache=tmp_path) as filler:
            await filler.completion("ECHO old")
        async with make_client(srv, cache=tmp_path, cache_write=False) as client:
            assert await client.completion("ECHO old") == "old"
            await client.completion("ECHO new")
        assert srv.requests == 2
    assert cache_info(tmp_path).entries == 1


async def test_cache_read_false_sends_and_refreshes_the_store(tmp_path: Path) -> None:
    with FakeLLMServer() as srv:
        async with make_client(srv, cache=tmp_path) as filler:
            await filler.completion("ECHO a")
        async with make_client(srv, cache=tmp_path, cache_read=False) as client:
            await client.completion("ECHO a")
            await client.completion("ECHO b")
        assert srv.requests == 3
    assert cache_info(tmp_path).entries == 2


async def test_a_failed_request_is_not_cached(tmp_path: Path) -> None:
    with FakeLLMServer() as srv:
        async with make_client(srv, cache=tmp_path, max_retries=0) as client:
            srv.inject("500")
            with pytest.raises(LLMError, match="server error 500"):
                await client.completion("ECHO x")
            assert await client.completion("ECHO x") == "x"
    assert srv.requests == 2


async def test_a_custom_store_object_is_used_and_left_open(tmp_path: Path) -> None:
    store = SQLiteCache(tmp_path, max_bytes=10_000_000)
    with FakeLLMServer() as srv:
        async with make_client(srv, cache=store) as client:
            await client.completion("ECHO mine")
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "ECHO mine"}]}
        key = request_key(srv.url, body)
    assert key is not None
    assert store.get_many([key])[key].text == "mine"  # still open, and keyed as documented
    store.close()


EXITS_WITHOUT_CLOSING = """
import sys
from rlm import AsyncOpenAIClient
from rlm.loop import run_sync

client = AsyncOpenAIClient(model="fake-model", api_key="k", base_url=sys.argv[1], cache=sys.argv[2])
print(run_sync(client.completion_batch(["ECHO one", "ECHO two", "ECHO three"])))
"""


def test_a_script_that_never_closes_its_client_still_stores_its_replies(tmp_path: Path) -> None:
    import subprocess
    import sys

    with FakeLLMServer() as srv:
        proc = subprocess.run([sys.executable, "-c", EXITS_WITHOUT_CLOSING, srv.url, str(tmp_path)],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert cache_info(tmp_path).entries == 3


def test_a_bad_cache_argument_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cache must be"):
        AsyncOpenAIClient(api_key="k", cache=42)


# -- through RLM -------------------------------------------------------------------------

ROOT = "cache-root"
ROOT_SCRIPT = [
    "```repl\nparts = context.split('|')\n"
    "answers = llm_query_batch(['ECHO ' + p for p in parts])\nprint(answers)\n```",
    "```repl\nFINAL(' '.join(answers))\n```",
]


def run_once(srv: FakeLLMServer, cache: object, **kw: object) -> object:
    rlm = RLM(model=ROOT, recursive_model="fake-model", base_url=srv.url, api_key="k",
              sandbox="local", cache=cache, **kw)  # type: ignore[arg-type]
    try:
        return rlm.completion(context="a|b|c|a|b", query="echo the parts")
    finally:
        rlm.close()


def test_an_rlm_run_repeated_with_a_cache_sends_no_request(tmp_path: Path) -> None:
    with FakeLLMServer(scripts={ROOT: ROOT_SCRIPT}) as srv:
        first = run_once(srv, tmp_path)
        sent = srv.requests
        again = run_once(srv, tmp_path)
        assert srv.requests == sent
    assert first.answer == again.answer == "a b c a b"  # type: ignore[attr-defined]
    # Two root turns and three distinct chunks were sent; the repeated two were joined.
    assert sent == 2 + 3
    assert first.usage["sub"].cached_calls == 2  # type: ignore[attr-defined]
    usage = again.total_usage  # type: ignore[attr-defined]
    assert usage.calls == 0
    assert usage.cached_calls == 2 + 5
    assert again.usage["sub"].cached_calls == 5  # type: ignore[attr-defined]


def test_the_trajectory_marks_each_cached_call(tmp_path: Path) -> None:
    with FakeLLMServer(scripts={ROOT: ROOT_SCRIPT}) as srv:
        first = run_once(srv, tmp_path)
        again = run_once(srv, tmp_path)

    def marks(result: object) -> tuple[list[bool], list[int], list[bool]]:
        events = result.trajectory  # type: ignore[attr-defined]
        calls = [c for e in events if e["type"] == "sub_queries" for c in e["calls"]]
        cells = [e["cached_sub_calls"] for e in events if e["type"] == "cell_result"]
        roots = [e["cached"] for e in events if e["type"] == "root_reply"]
        return [bool(c.get("cached")) for c in calls], cells, roots

    # a|b|c|a|b: the second a and b waited for the first ones.
    assert marks(first) == ([False, False, False, True, True], [2, 0], [False, False])
    assert marks(again) == ([True] * 5, [5, 0], [True, True])


def test_budgets_ignore_cached_calls(tmp_path: Path) -> None:
    with FakeLLMServer(scripts={ROOT: ROOT_SCRIPT}) as srv:
        run_once(srv, tmp_path)
        # A budget no real call fits in: the cached run still finishes.
        prices = {ROOT: (1.0, 1.0), "fake-model": (1.0, 1.0)}
        again = run_once(srv, tmp_path, max_tokens=1, max_cost_usd=1e-9, prices=prices)
        uncached = run_once(srv, None, max_tokens=1)
    assert again.answer == "a b c a b"  # type: ignore[attr-defined]
    assert again.stopped_reason == "final"  # type: ignore[attr-defined]
    assert uncached.stopped_reason == "budget"  # type: ignore[attr-defined]


def test_rlm_refuses_a_cache_for_clients_it_did_not_create(tmp_path: Path) -> None:
    with FakeLLMServer() as srv, pytest.raises(ConfigError, match="pass them to the AsyncOpenAIClient"):
        RLM(client=make_client(srv), cache=tmp_path)


@pytest.mark.parametrize("sandbox", ["local", "process"])
def test_llm_query_cache_false_asks_afresh(tmp_path: Path, sandbox: str) -> None:
    script = [
        "```repl\na = llm_query('ECHO x')\nb = llm_query('ECHO x')\n"
        "c = llm_query('ECHO x', cache=False)\nd = llm_query_batch(['ECHO x'] * 3, cache=False)\n"
        "print(a, b, c, d)\n```",
        "```repl\nFINAL('done')\n```",
    ]
    with FakeLLMServer(scripts={ROOT: script}) as srv:
        rlm = RLM(model=ROOT, recursive_model="fake-model", base_url=srv.url, api_key="k",
                  sandbox=sandbox, cache=tmp_path)
        try:
            res = rlm.completion(context="", query="q")
        finally:
            rlm.close()
    assert res.answer == "done"
    assert res.usage["sub"].calls == 1 + 1 + 3
    assert res.usage["sub"].cached_calls == 1


def test_llm_query_cache_must_be_a_bool(tmp_path: Path) -> None:
    with FakeLLMServer() as srv:
        client = make_client(srv)
        with REPLEnv(context="", client=client) as env:
            r = env.execute("llm_query('ECHO x', cache='no')")
        client.close_sync()
    assert "must be a bool" in (r.error or "")
