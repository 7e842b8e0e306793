"""The pieces both servers share, in-process: allowed-path reading, REPL sessions, the bind rule."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rlm import AsyncOpenAIClient
from rlm.errors import AccessDeniedError, ConfigError, SessionError
from rlm.serve.auth import bearer_matches, check_bind, is_loopback
from rlm.serve.paths import AllowedDirs
from rlm.serve.sessions import SessionManager
from rlm.testing import FakeLLMServer


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "doc.txt").write_text("inside text", encoding="utf-8")
    (allowed / "sub").mkdir()
    (allowed / "sub" / "deep.txt").write_text("deep text", encoding="utf-8")
    (outside / "secret.txt").write_text("secret", encoding="utf-8")
    return allowed, outside


def test_files_under_an_allowed_dir_are_read_by_absolute_or_relative_path(tree: tuple[Path, Path]) -> None:
    allowed, _ = tree
    dirs = AllowedDirs([allowed])
    assert dirs.read_text(str(allowed / "doc.txt")) == "inside text"
    assert dirs.read_text("sub/deep.txt") == "deep text"
    assert dirs.read_text("sub/../doc.txt") == "inside text"


def test_paths_leading_outside_are_refused_without_saying_whether_they_exist(tree: tuple[Path, Path]) -> None:
    allowed, outside = tree
    dirs = AllowedDirs([allowed])
    for path in (str(outside / "secret.txt"), "../outside/secret.txt", "../outside/missing.txt", "/etc/passwd"):
        with pytest.raises(AccessDeniedError, match="outside the allowed directories"):
            dirs.read_text(path)


def test_symlinks_out_of_an_allowed_dir_are_refused(tree: tuple[Path, Path]) -> None:
    allowed, outside = tree
    (allowed / "file-link.txt").symlink_to(outside / "secret.txt")
    (allowed / "dir-link").symlink_to(outside)
    dirs = AllowedDirs([allowed])
    for path in ("file-link.txt", "dir-link/secret.txt"):
        with pytest.raises(AccessDeniedError, match="through a symlink"):
            dirs.read_text(path)


def test_a_symlink_that_stays_inside_is_followed(tree: tuple[Path, Path]) -> None:
    allowed, _ = tree
    (allowed / "alias.txt").symlink_to(allowed / "sub" / "deep.txt")
    assert AllowedDirs([allowed]).read_text("alias.txt") == "deep text"


def test_only_regular_utf8_files_within_the_size_limit_are_read(tree: tuple[Path, Path]) -> None:
    allowed, _ = tree
    os.mkfifo(allowed / "pipe")
    (allowed / "big.txt").write_text("x" * 2000, encoding="utf-8")
    (allowed / "bin.dat").write_bytes(b"\xff\xfe\x00")
    dirs = AllowedDirs([allowed], max_bytes=1000)
    with pytest.raises(AccessDeniedError, match="not a regular file"):
        dirs.read_text("pipe")  # would block a plain open() forever
    with pytest.raises(AccessDeniedError, match="sub"):
        dirs.read_text("sub")
    with pytest.raises(AccessDeniedError, match="at most 1,000"):
        dirs.read_text("big.txt")
    with pytest.raises(AccessDeniedError, match="not UTF-8"):
        dirs.read_text("bin.dat")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dirs.read_text("nope.txt")


def test_without_allow_dir_no_file_is_read(tree: tuple[Path, Path]) -> None:
    allowed, _ = tree
    with pytest.raises(AccessDeniedError, match="--allow-dir"):
        AllowedDirs([]).read_text(str(allowed / "doc.txt"))
    with pytest.raises(ConfigError, match="not an existing directory"):
        AllowedDirs([allowed / "doc.txt"])


def test_listening_beyond_loopback_needs_a_key() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "key")
    with pytest.raises(ConfigError, match="--auth-key"):
        check_bind("0.0.0.0", None)
    assert bearer_matches("Bearer key", "key") and bearer_matches(None, None)
    assert not bearer_matches("Bearer nope", "key") and not bearer_matches("key", "key")


@pytest.fixture
async def client() -> AsyncIterator[AsyncOpenAIClient]:
    async with FakeLLMServer() as srv:
        async with AsyncOpenAIClient(model="m", api_key="k", base_url=srv.url) as c:
            yield c


async def test_sessions_keep_state_and_report_batch_progress(client: AsyncOpenAIClient) -> None:
    manager = SessionManager(client, sandbox="local")
    seen: list[tuple[int, int]] = []
    async with manager.reaping():
        sid, description = await manager.open(["a", "b", "c"])
        assert "3 items" in description
        out = await manager.execute(sid, "r = llm_query_batch([f'ECHO {x}' for x in context])\nprint(r)",
                                    progress=lambda done, total: seen.append((done, total)))
        assert out["stdout"] == "['a', 'b', 'c']\n" and out["sub_calls"] == 3
        assert seen[-1] == (3, 3)
        assert (await manager.execute(sid, "print(len(r))"))["stdout"] == "3\n"
    assert len(manager) == 0  # leaving reaping() closes every session


async def test_idle_sessions_are_closed_and_busy_ones_are_not(client: AsyncOpenAIClient) -> None:
    manager = SessionManager(client, sandbox="local", idle_timeout_s=0.0)
    try:
        busy, _ = await manager.open("y")
        cell = asyncio.create_task(manager.execute(busy, "import time\ntime.sleep(0.5)\nprint('done')"))
        await asyncio.sleep(0)  # the cell has started: its session is busy
        idle, _ = await manager.open("x")  # opening reaps first: the busy one stays
        assert len(manager) == 2
        assert await manager.reap() == 1
        assert len(manager) == 1
        assert (await cell)["stdout"] == "done\n"
        with pytest.raises(SessionError, match="expired"):
            await manager.execute(idle, "print(1)")
    finally:
        await manager.aclose()
