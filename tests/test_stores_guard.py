"""Stores read by other local users or handed over as files: the cache is private to its
user, and a session file can neither crash the loader nor hide the REPL's own names."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rlm import RLM
from rlm.errors import ConfigError
from rlm.testing import FakeLLMServer

ROOT = "root-model"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def use_cache_under_umask_022(directory: Path) -> dict[str, int]:
    """Open the cache and store a reply in a process whose umask is the usual 022; the
    modes of the directory's files while the database is open (WAL and shared memory
    exist only then)."""
    code = textwrap.dedent(
        """
        import json, os, stat, sys
        os.umask(0o022)
        from rlm.cache import CachedReply, SQLiteCache
        cache = SQLiteCache(sys.argv[1])
        cache.put_many({"k": CachedReply("reply quoting a document", "m", 1, 1)})
        assert cache.get_many(["k"])["k"].text == "reply quoting a document"
        print(json.dumps({p.name: stat.S_IMODE(p.stat().st_mode) for p in cache.directory.iterdir()}))
        cache.close()
        """
    )
    done = subprocess.run([sys.executable, "-c", code, str(directory)], check=True, timeout=120,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_new_cache_directory_and_its_database_files_are_private(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    modes = use_cache_under_umask_022(directory)
    assert mode(directory) == 0o700
    assert modes == {"cache.sqlite3": 0o600, "cache.sqlite3-wal": 0o600, "cache.sqlite3-shm": 0o600}


def test_a_database_left_readable_by_an_older_version_is_narrowed(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    use_cache_under_umask_022(directory)
    for path in directory.iterdir():
        path.chmod(0o644)
    use_cache_under_umask_022(directory)
    assert all(mode(path) == 0o600 for path in directory.iterdir())


@pytest.fixture
def rlm() -> Iterator[RLM]:
    with FakeLLMServer() as srv:
        made = RLM(model=ROOT, base_url=srv.url, api_key="k", sandbox="local",
                   tools={"lookup": lambda key: key})
        try:
            yield made
        finally:
            made.close()


def session_file(tmp_path: Path, variables: Any) -> Path:
    path = tmp_path / "session.json"
    path.write_text(json.dumps({"format": "rlm-session", "version": 1, "variables": variables}))
    return path


def test_a_session_file_nested_past_the_json_parser_is_a_config_error(tmp_path: Path, rlm: RLM) -> None:
    path = tmp_path / "session.json"
    path.write_text('{"format": "rlm-session", "version": 1, "variables": {"x": ' + "[" * 200_000 + "]" * 200_000 + "}}")
    with pytest.raises(ConfigError, match="nested too deeply"):
        rlm.load_session(path, "ctx")


def test_a_session_variable_nested_deeper_than_any_saved_one_is_a_config_error(tmp_path: Path,
                                                                              rlm: RLM) -> None:
    # 100 tuples in tuples: the JSON parser reads it, the saver never writes it.
    path = tmp_path / "session.json"
    deep = '{"$t": [' * 100 + "1" + "]}" * 100
    path.write_text('{"format": "rlm-session", "version": 1, "variables": {"x": ' + deep + "}}")
    with pytest.raises(ConfigError, match="malformed session: a value nested deeper than 64"):
        rlm.load_session(path, "ctx")


@pytest.mark.parametrize("name", ["len", "str", "print", "open", "context", "llm_query", "llm_query_batch_async",
                                  "FINAL", "FINAL_VAR", "LLMQueryError", "lookup", "True", "class"])
def test_a_session_file_cannot_hide_the_repls_own_names(tmp_path: Path, rlm: RLM, name: str) -> None:
    with pytest.raises(ConfigError, match=f"named '{name}'"):
        rlm.load_session(session_file(tmp_path, {name: 1}), "ctx")


def test_saving_a_session_leaves_out_variables_that_hide_builtins(tmp_path: Path) -> None:
    cell = "```repl\nsum = 3\ntotal = sum + 1\nFINAL(str(total))\n```"
    path = tmp_path / "session.json"
    with FakeLLMServer(scripts={ROOT: [cell]}) as srv:
        rlm = RLM(model=ROOT, base_url=srv.url, api_key="k", sandbox="local")
        try:
            with rlm.session("ctx") as session:
                assert session.ask("add").answer == "4"
                session.save(path)
            restored = rlm.load_session(path, "ctx")
            restored.close()
        finally:
            rlm.close()
    saved = json.loads(path.read_text())
    assert saved["variables"] == {"total": 4}
    assert "hides the REPL's own name" in saved["not_saved"]["sum"]
    assert os.path.exists(path)
