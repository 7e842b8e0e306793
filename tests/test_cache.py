"""The sub-query cache's store, keys and single-flight layer (rlm.cache)."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from rlm.cache import (
    DB_NAME,
    Cache,
    CachedReply,
    RequestCache,
    SQLiteCache,
    cache_info,
    clear_cache,
    default_cache_dir,
    open_cache,
    request_key,
)
from rlm.errors import ConfigError

URL = "http://127.0.0.1:9/v1"
BASE: dict[str, Any] = {
    "model": "fake-model",
    "messages": [{"role": "user", "content": "What is in chunk 3?"}],
    "temperature": 0.0,
}


def reply(text: str, tokens: int = 5) -> CachedReply:
    return CachedReply(text, "fake-model", tokens, tokens)


# -- keys -----------------------------------------------------------------------------


def test_key_does_not_depend_on_dict_order() -> None:
    shuffled = {"temperature": 0.0, "messages": [{"content": "What is in chunk 3?", "role": "user"}],
                "model": "fake-model"}  # fmt: skip
    assert request_key(URL, BASE) == request_key(URL, shuffled)
    assert request_key(URL, BASE) == request_key(URL + "/", BASE)


@pytest.mark.parametrize(
    "change",
    [
        {"model": "other-model"},
        {"messages": [{"role": "user", "content": "What is in chunk 4?"}]},
        {"messages": [{"role": "system", "content": "be brief"},
                      {"role": "user", "content": "What is in chunk 3?"}]},
        {"temperature": 0.7},
        {"top_p": 0.9},
        {"max_tokens": 10},
        {"seed": 1},
        {"stop": ["\n"]},
        {"response_format": {"type": "json_object"}},
        {"tools": [{"type": "function", "function": {"name": "lookup"}}]},
    ],
)  # fmt: skip
def test_key_changes_when_a_parameter_that_changes_the_answer_changes(change: dict[str, Any]) -> None:
    assert request_key(URL, {**BASE, **change}) != request_key(URL, BASE)


def test_key_changes_with_the_endpoint() -> None:
    assert request_key("http://127.0.0.1:10/v1", BASE) != request_key(URL, BASE)
    assert request_key(None, BASE) == request_key("https://api.openai.com/v1", BASE)


def test_key_ignores_how_the_reply_is_delivered() -> None:
    assert request_key(URL, {**BASE, "stream": True, "user": "me"}) == request_key(URL, BASE)


def test_message_boundaries_are_part_of_the_key() -> None:
    one = {**BASE, "messages": [{"role": "user", "content": "ab"}]}
    two = {**BASE, "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    empty = {**BASE, "messages": []}
    none = {k: v for k, v in BASE.items() if k != "messages"}
    keys = {request_key(URL, b) for b in (one, two, empty, none)}
    assert len(keys) == 4


def test_structured_message_content_has_a_key() -> None:
    parts = [{"type": "text", "text": "What is in chunk 3?"}]
    body = {**BASE, "messages": [{"role": "user", "content": parts}]}
    assert request_key(URL, body) not in (None, request_key(URL, BASE))


def test_a_body_that_is_not_plain_data_has_no_key() -> None:
    assert request_key(URL, {**BASE, "temperature": object()}) is None


# -- the SQLite store -------------------------------------------------------------------


def test_store_returns_what_was_put_and_nothing_else(tmp_path: Path) -> None:
    store = SQLiteCache(tmp_path)
    store.put_many({"a": reply("alpha", 3), "b": reply("beta")})
    assert store.get_many(["a", "b", "c"]) == {"a": reply("alpha", 3), "b": reply("beta")}
    store.close()
    reopened = SQLiteCache(tmp_path)
    assert reopened.get_many(["a"]) == {"a": reply("alpha", 3)}
    reopened.close()


def test_a_batch_larger_than_one_query_is_found_whole(tmp_path: Path) -> None:
    store = SQLiteCache(tmp_path)
    entries = {f"k{i}": reply(f"v{i}") for i in range(2500)}
    store.put_many(entries)
    assert store.get_many(list(entries) + ["absent"]) == entries
    store.close()


def test_info_counts_entries_bytes_and_hits(tmp_path: Path) -> None:
    store = SQLiteCache(tmp_path)
    store.put_many({"a": reply("alpha"), "b": reply("beta")})
    store.get_many(["a", "b", "zzz"])
    store.get_many(["a"])
    info = store.info()
    store.close()
    assert (info.entries, info.hits) == (2, 3)
    assert info.bytes >= len("alpha") + len("beta")
    assert info.file_bytes > 0
    assert info.path == str(tmp_path)


def test_replacing_an_entry_keeps_the_byte_count_exact(tmp_path: Path) -> None:
    store = SQLiteCache(tmp_path)
    store.put_many({"a": reply("x" * 1000)})
    big = store.info().bytes
    store.put_many({"a": reply("x")})
    assert store.info().bytes == big - 999
    store.close()


def test_ttl_makes_old_entries_misses_and_purges_them(tmp_path: Path) -> None:
    store = SQLiteCache(tmp_path, ttl=0.2)
    store.put_many({"old": reply("stale")})
    assert store.get_many(["old"]) == {"old": reply("stale")}
    time.sleep(0.3)
    assert store.get_many(["old"]) == {}
    store.put_many({"new": reply("fresh")})
    info = store.info()
    store.close()
    assert info.entries == 1
    assert SQLiteCache(tmp_path).get_many(["new"]) == {"new": reply("fresh")}


def test_size_limit_evicts_the_least_recently_used(tmp_path: Path) -> None:
    one = SQLiteCache(tmp_path)
    one.put_many({"probe": reply("x" * 100)})
    entry_bytes = one.info().bytes
    one.clear()
    one.close()
    # Room for three entries, not four.
    store = SQLiteCache(tmp_path, max_bytes=entry_bytes * 3 + entry_bytes // 2)
    store.put_many({"a": reply("a" * 100), "b": reply("b" * 100), "c": reply("c" * 100)})
    time.sleep(0.01)
    store.get_many(["a"])  # a is now the most recently used
    store.put_many({"d": reply("d" * 100)})
    left = store.get_many(["a", "b", "c", "d"])
    info = store.info()
    store.close()
    assert "b" not in left
    assert {"a", "d"} <= set(left)
    assert info.bytes <= entry_bytes * 3 + entry_bytes // 2


def test_clear_removes_every_entry(tmp_path: Path) -> None:
    store = SQLiteCache(tmp_path)
    store.put_many({f"k{i}": reply("v") for i in range(50)})
    store.get_many(["k1"])
    store.clear()
    info = store.info()
    assert (info.entries, info.bytes, info.hits) == (0, 0, 0)
    assert store.get_many(["k1"]) == {}
    store.close()


def test_info_and_clear_of_a_directory_without_a_cache_do_not_create_one(tmp_path: Path) -> None:
    where = tmp_path / "nothing-here"
    assert cache_info(where).entries == 0
    assert clear_cache(where).entries == 0
    assert not where.exists()


def test_clear_cache_reports_what_it_removed(tmp_path: Path) -> None:
    store = SQLiteCache(tmp_path)
    store.put_many({"a": reply("alpha")})
    store.close()
    assert clear_cache(tmp_path).entries == 1
    assert cache_info(tmp_path).entries == 0


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from rlm.cache import SQLiteCache, CachedReply

    directory, name, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    while not go.exists():
        time.sleep(0.005)
    store = SQLiteCache(directory)
    for batch in range(40):
        mine = {f"{name}-{batch}-{i}": CachedReply(f"{name} {batch} {i}", "m", 1, 1)
                for i in range(10)}
        shared = {f"shared-{batch}": CachedReply(f"shared {batch}", "m", 1, 1)}
        store.put_many({**mine, **shared})
        got = store.get_many(list(mine) + list(shared))
        assert set(got) == set(mine) | set(shared), (name, batch)
        other = "b" if name == "a" else "a"
        seen = store.get_many([f"{other}-{batch}-{i}" for i in range(10)])
        assert all(r.text == k.replace("-", " ") for k, r in seen.items())
    store.close()
    print("ok", name)
    """
)


OPENER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from rlm.cache import CachedReply, SQLiteCache
    go = Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.0005)
    store = SQLiteCache(Path(sys.argv[1]))
    store.put_many({sys.argv[3]: CachedReply("t", "m", 1, 1)})
    store.close()
    """
)


def test_processes_opening_a_new_cache_at_the_same_moment_all_succeed(tmp_path: Path) -> None:
    # Switching a new database to WAL needs it to itself, and SQLite refuses that at once
    # ("database is locked", no busy wait) while another process does the same: without
    # a retry, some of eight processes starting together failed in most rounds.
    for round_ in range(8):
        go = tmp_path / f"go{round_}"
        where = tmp_path / f"c{round_}"
        procs = [
            subprocess.Popen([sys.executable, "-c", OPENER, str(where), str(go), f"k{i}"],
                             stderr=subprocess.PIPE, text=True)
            for i in range(8)
        ]
        time.sleep(0.5)  # every process is up and polling for the go file
        go.touch()
        errors = [p.communicate(timeout=120)[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * 8, errors
        store = SQLiteCache(where)
        assert set(store.get_many([f"k{i}" for i in range(8)])) == {f"k{i}" for i in range(8)}
        store.close()


def test_two_processes_share_one_directory_concurrently(tmp_path: Path) -> None:
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path / "c"), name, str(go)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name in ("a", "b")
    ]  # fmt: skip
    go.touch()
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
        assert out.startswith("ok")
    store = SQLiteCache(tmp_path / "c")
    keys = [f"{n}-{b}-{i}" for n in "ab" for b in range(40) for i in range(10)]
    got = store.get_many(keys + [f"shared-{b}" for b in range(40)])
    info = store.info()
    store.close()
    assert len(got) == 840
    assert info.entries == 840
    with sqlite3.connect(tmp_path / "c" / DB_NAME) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


# -- cache= arguments -------------------------------------------------------------------


def test_open_cache_accepts_off_a_path_and_a_store(tmp_path: Path) -> None:
    assert open_cache(None) is None
    assert open_cache(False) is None
    store = open_cache(tmp_path / "c")
    assert isinstance(store, SQLiteCache) and store.directory == tmp_path / "c"
    assert open_cache(store) is store


def test_open_cache_true_uses_the_per_user_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RLM_CACHE_DIR", str(tmp_path / "mine"))
    store = open_cache(True)
    assert isinstance(store, SQLiteCache) and store.directory == tmp_path / "mine"


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="the XDG rule is for Linux")
def test_default_directory_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RLM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "rlm"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")
    assert default_cache_dir() == Path.home() / ".cache" / "rlm"


def test_open_cache_rejects_what_it_cannot_use(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cache must be"):
        open_cache(3)
    afile = tmp_path / "f"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        open_cache(afile)


# -- RequestCache: single-flight and write-back -------------------------------------------


class CountingStore(Cache):
    """A custom in-memory store (what a user might plug in), counting calls."""

    def __init__(self) -> None:
        self.data: dict[str, CachedReply] = {}
        self.gets = 0
        self.puts = 0

    def get_many(self, keys: Any) -> dict[str, CachedReply]:
        self.gets += 1
        return {k: self.data[k] for k in keys if k in self.data}

    def put_many(self, entries: Any) -> None:
        self.puts += 1
        self.data.update(entries)


async def _fan_out(cache: RequestCache, texts: list[str], sent: list[str]) -> list[tuple[str, bool]]:
    bodies = [{**BASE, "messages": [{"role": "user", "content": t}]} for t in texts]
    keys, known = await cache.prepare(URL, bodies)

    async def one(key: str | None, text: str) -> tuple[str, bool]:
        async def send() -> CachedReply:
            sent.append(text)
            await asyncio.sleep(0.05)
            return reply(text.upper())

        got, reused = await cache.resolve(key, send, known.get(key) if key else None)
        return got.text, reused

    return await asyncio.gather(*(one(k, t) for k, t in zip(keys, texts, strict=True)))


async def test_identical_requests_in_flight_are_sent_once_without_a_store() -> None:
    cache = RequestCache(None)
    sent: list[str] = []
    texts = ["alpha" if i % 2 else "beta" for i in range(200)]
    out = await _fan_out(cache, texts, sent)
    assert sorted(sent) == ["alpha", "beta"]
    assert [t for t, _ in out] == [t.upper() for t in texts]
    assert sum(reused for _, reused in out) == 198


async def test_replies_are_written_back_and_found_by_the_next_batch() -> None:
    store = CountingStore()
    cache = RequestCache(store)
    sent: list[str] = []
    await _fan_out(cache, ["a", "b", "c"], sent)
    await cache.flush()
    assert len(store.data) == 3
    again = RequestCache(store)
    out = await _fan_out(again, ["c", "b", "a", "d"], sent)
    assert sent == ["a", "b", "c", "d"]
    assert out == [("C", True), ("B", True), ("A", True), ("D", False)]
    await cache.aclose()
    await again.aclose()


async def test_a_cancelled_sender_hands_the_request_to_a_waiting_caller() -> None:
    cache = RequestCache(None)
    key = request_key(URL, BASE)
    calls = 0

    async def send() -> CachedReply:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.1)
        return reply(f"sent {calls}")

    leader = asyncio.ensure_future(cache.resolve(key, send))
    await asyncio.sleep(0.01)
    follower = asyncio.ensure_future(cache.resolve(key, send))
    await asyncio.sleep(0.01)
    leader.cancel()
    got, reused = await follower
    assert (got.text, reused, calls) == ("sent 2", False, 2)


async def test_a_failure_reaches_every_caller_waiting_on_it() -> None:
    cache = RequestCache(None)
    key = request_key(URL, BASE)

    async def send() -> CachedReply:
        await asyncio.sleep(0.05)
        raise RuntimeError("boom")

    results = await asyncio.gather(
        *(cache.resolve(key, send) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_read_false_sends_every_request_but_still_stores_it() -> None:
    store = CountingStore()
    cache = RequestCache(store, read=False)
    sent: list[str] = []
    await _fan_out(cache, ["a", "a"], sent)
    await cache.aclose()
    assert sent == ["a", "a"]
    assert len(store.data) == 1


async def test_write_false_stores_nothing() -> None:
    store = CountingStore()
    cache = RequestCache(store, write=False)
    await _fan_out(cache, ["a", "b"], [])
    await cache.aclose()
    assert store.data == {} and store.puts == 0


async def test_a_failing_store_is_a_miss_not_an_error() -> None:
    class Broken(CountingStore):
        def get_many(self, keys: Any) -> dict[str, CachedReply]:
            raise sqlite3.OperationalError("disk I/O error")

    cache = RequestCache(Broken())
    sent: list[str] = []
    out = await _fan_out(cache, ["a"], sent)
    await cache.aclose()
    assert out == [("A", False)] and sent == ["a"]
