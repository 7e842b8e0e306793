"""`rlm cache info` and `rlm cache clear` through a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from rlm.cache import CachedReply, SQLiteCache
from rlm.testing import FakeLLMServer


def rlm_cmd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "RLM_"))}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "rlm.cli", *args], capture_output=True,
                          text=True, env=full_env, timeout=60)


def fill(directory: Path, n: int, reads: int) -> None:
    store = SQLiteCache(directory)
    store.put_many({f"k{i}": CachedReply(f"reply {i}", "m", 3, 4) for i in range(n)})
    store.get_many([f"k{i}" for i in range(reads)])
    store.close()


def test_cache_info_reports_entries_size_and_hits(tmp_path: Path) -> None:
    fill(tmp_path, 12, reads=5)
    proc = rlm_cmd("cache", "info", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "entries:  12" in proc.stdout
    assert "hits:     5" in proc.stdout
    data = json.loads(rlm_cmd("cache", "info", str(tmp_path), "--json").stdout)
    assert (data["entries"], data["hits"]) == (12, 5)
    assert data["bytes"] > 0 and data["path"] == str(tmp_path)


def test_cache_clear_empties_the_directory(tmp_path: Path) -> None:
    fill(tmp_path, 7, reads=0)
    proc = rlm_cmd("cache", "clear", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "7 entries removed" in proc.stdout
    assert SQLiteCache(tmp_path).get_many(["k1"]) == {}


def test_cache_commands_default_to_rlm_cache_dir(tmp_path: Path) -> None:
    fill(tmp_path / "mine", 3, reads=0)
    env = {"RLM_CACHE_DIR": str(tmp_path / "mine")}
    assert "entries:  3" in rlm_cmd("cache", "info", env=env).stdout
    assert rlm_cmd("cache", "clear", env=env).returncode == 0
    assert "entries:  0" in rlm_cmd("cache", "info", env=env).stdout


def test_cache_with_an_unknown_action_is_a_usage_error() -> None:
    proc = rlm_cmd("cache", "drop")
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr


ROOT = "cli-cache-root"
SCRIPT = [
    "```repl\nparts = context.split()\nr = llm_query_batch(['ECHO ' + p for p in parts])\n```",
    "```repl\nFINAL(' '.join(r))\n```",
]


def test_run_with_cache_twice_sends_nothing_the_second_time(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("x y x y")
    with FakeLLMServer(scripts={ROOT: SCRIPT}) as srv:
        args = ("run", "--context", str(ctx), "--query", "q", "--model", ROOT,
                "--recursive-model", "fake-model", "--base-url",
                srv.url, "--api-key", "k", "--sandbox", "local", "--json")
        first = rlm_cmd(*args, "--cache", str(tmp_path / "c"))
        sent = srv.requests
        again = rlm_cmd(*args, "--cache", str(tmp_path / "c"))
        assert srv.requests == sent == 2 + 2  # two root turns, two distinct items
        plain = rlm_cmd(*args, "--no-cache")
        assert srv.requests == sent + 2 + 4  # every item sent, duplicates too
    for proc in (first, again, plain):
        assert proc.returncode == 0, proc.stderr
    assert json.loads(again.stdout)["answer"] == "x y x y"
    assert json.loads(again.stdout)["usage"]["sub"]["cached_calls"] == 4


def test_run_with_cache_and_no_cache_together_is_a_usage_error(tmp_path: Path) -> None:
    proc = rlm_cmd("run", "--context", "-", "--query", "q", "--cache", "--no-cache")
    assert proc.returncode == 2
    assert "not allowed with" in proc.stderr
