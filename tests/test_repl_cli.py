"""`rlm repl` driven through a pseudo-terminal, the way a person uses it.

The fake server runs in this process so the tests can read its counters: when Ctrl-C
cancels a batch, the server's ``in_flight`` must fall back to 0 (the requests were
really cancelled, not left running behind the prompt).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from pty_terminal import PtyChild, spawn
from rlm_support import wait_until

from rlm.testing import FakeLLMServer

# Escape sequences (colours, cursor moves, the window title) and carriage returns, so
# the tests read the screen as text.
_ANSI = re.compile(r"\x1b\][^\x07]*\x07|\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]|\r")
# A request slower than any test: only a cancellation can end it in time.
SLOW_S = 120.0


class Terminal:
    """An `rlm repl` process on a pseudo-terminal, read as plain text."""

    def __init__(self, child: PtyChild) -> None:
        self.child = child
        self.raw = ""
        self.pos = 0

    def expect(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        """Wait for ``pattern`` in the screen text after the previous match."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            screen = _ANSI.sub("", self.raw)
            found = rx.search(screen, self.pos)
            if found:
                self.pos = found.end()
                return found
            if time.monotonic() > deadline or not self.child.isalive() and not self._more():
                raise AssertionError(f"{pattern!r} never appeared; the screen ends with:\n{screen[-1500:]}")
            self._more()

    def _more(self) -> bool:
        try:
            chunk = self.child.read_nonblocking(65536, timeout=0.2)
        except (pexpect.TIMEOUT, pexpect.EOF):
            return False
        # Answer the shell's cursor-position requests as a real terminal would;
        # unanswered, prompt_toolkit stalls on each one before giving up.
        for _ in range(chunk.count("\x1b[6n")):
            self.child.send("\x1b[1;1R")
        self.raw += chunk
        return True

    def run(self, line: str) -> None:
        """Type ``line`` at the next prompt."""
        self.expect(r"In \[\d+\]: ")
        self.child.sendline(line)


def clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "RLM_"))}
    # IPython keeps its history there: a scratch directory, never the developer's.
    env.update(IPYTHONDIR=str(tmp_path / "ipython"), TERM="xterm", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture
def context_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("first line\nsecond line\nthird line\n")
    return path


@pytest.fixture
def repl(tmp_path: Path, context_file: Path, server: FakeLLMServer) -> Iterator[Terminal]:
    """`rlm repl --context FILE --base-url URL --api-key k --model m` on a pty."""
    child = spawn(
        sys.executable,
        ["-m", "rlm.cli", "repl", "--context", str(context_file), "--base-url", server.url,
         "--api-key", "k", "--model", "m"],
        env=clean_env(tmp_path), dimensions=(50, 200), timeout=30,
    )
    term = Terminal(child)
    try:
        yield term
    finally:
        server.latency = 0
        if child.isalive():
            child.terminate(force=True)
        child.close()


def test_the_banner_describes_the_context_and_the_tools(repl: Terminal, server: FakeLLMServer) -> None:
    repl.expect(r"rlm repl: `context` is a str of length 34\.")
    repl.expect(r"llm_query\(prompt\), llm_query_batch\(prompts\)")
    repl.expect(rf"model m at {re.escape(server.url)}")


def test_the_banner_has_no_random_tip(repl: Terminal) -> None:
    repl.expect(r"In \[1\]: ")
    assert "Tip:" not in _ANSI.sub("", repl.raw)


def test_a_wrong_prompt_type_is_one_clear_line(repl: Terminal, server: FakeLLMServer) -> None:
    repl.run("llm_query(123)")
    found = repl.expect(r"ReplArgumentError: llm_query\(prompt\): prompt must be a str[^\n]*\n")
    repl.expect(r"In \[2\]: ")
    between = _ANSI.sub("", repl.raw)[found.end():]
    assert "Traceback" not in _ANSI.sub("", repl.raw) and "concurrent" not in between
    repl.child.sendline("llm_query_batch(['ECHO a', 7])")
    repl.expect(r"ReplArgumentError: llm_query_batch\(prompts\): item 1 is a int, not a str")
    assert server.requests == 0


def test_a_batch_typed_at_the_prompt_prints_its_answers(repl: Terminal, server: FakeLLMServer) -> None:
    repl.run("llm_query_batch(['ECHO a', 'ECHO b'])")
    repl.expect(r"Out\[1\]: \['a', 'b'\]")
    repl.run("[llm_query('ECHO ' + line) for line in context.splitlines()]")
    repl.expect(r"Out\[2\]: \['first line', 'second line', 'third line'\]")
    repl.run("await llm_query_batch_async(['ECHO c', 'ECHO d'])")
    repl.expect(r"Out\[3\]: \['c', 'd'\]")
    assert server.requests == 7


def test_ctrl_c_during_a_slow_batch_cancels_its_requests_and_the_shell_stays_usable(
    repl: Terminal, server: FakeLLMServer
) -> None:
    server.latency = SLOW_S
    repl.run("replies = llm_query_batch(['ECHO slow %d' % i for i in range(8)])")
    assert wait_until(lambda: server.in_flight == 8, 15), server.stats()
    repl.child.sendintr()
    repl.expect(r"KeyboardInterrupt: llm_query_batch cancelled \(0 of 8 answered\); nothing is left running")
    assert wait_until(lambda: server.in_flight == 0, 15), f"requests still running: {server.stats()}"
    server.latency = 0
    repl.run("1 + 1")
    repl.expect(r"Out\[\d+\]: 2\b")
    repl.run("llm_query_batch(['ECHO again'])")
    repl.expect(r"Out\[\d+\]: \['again'\]")
    repl.run("'replies' in dir()")
    repl.expect(r"Out\[\d+\]: False")  # the interrupted assignment never happened


def test_ctrl_c_during_an_awaited_batch_cancels_it_too(repl: Terminal, server: FakeLLMServer) -> None:
    server.latency = SLOW_S
    repl.run("replies = await llm_query_batch_async(['ECHO slow %d' % i for i in range(8)])")
    assert wait_until(lambda: server.in_flight == 8, 15), server.stats()
    repl.child.sendintr()
    repl.expect(r"KeyboardInterrupt: cancelled the awaited call and its requests")
    assert wait_until(lambda: server.in_flight == 0, 15), f"requests still running: {server.stats()}"
    server.latency = 0
    repl.run("await llm_query_async('ECHO after')")
    repl.expect(r"Out\[\d+\]: 'after'")
    repl.run("1 + 1")
    repl.expect(r"Out\[\d+\]: 2\b")


def test_ctrl_c_in_plain_code_still_shows_where_it_stopped(repl: Terminal) -> None:
    repl.run("import time; print('sleep' + 'ing'); time.sleep(60)")
    repl.expect(r"\nsleeping")  # the output, not the echo of the typed line
    repl.child.sendintr()
    repl.expect(r"KeyboardInterrupt")
    repl.expect(r"time\.sleep\(60\)")  # IPython's own traceback, pointing at the cell
    repl.run("2 * 21")
    repl.expect(r"Out\[\d+\]: 42")


def test_ctrl_d_leaves_the_shell(repl: Terminal) -> None:
    repl.expect(r"In \[1\]: ")
    repl.child.sendeof()
    repl.child.expect(pexpect.EOF, timeout=30)
    repl.child.close()
    assert repl.child.exitstatus == 0


def test_repl_without_a_key_or_a_context_file_is_a_usage_error(tmp_path: Path, context_file: Path) -> None:
    def rlm_repl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "rlm.cli", "repl", *args], capture_output=True,
                              text=True, env=clean_env(tmp_path), timeout=60)

    no_key = rlm_repl("--context", str(context_file))
    assert no_key.returncode == 2
    assert "no API key" in no_key.stderr
    no_file = rlm_repl("--context", str(tmp_path / "missing.txt"), "--api-key", "k")
    assert no_file.returncode == 2
    assert "context file not found" in no_file.stderr
