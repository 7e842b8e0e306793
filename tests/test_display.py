"""Rendering runs for people: the live terminal view, logs, HTML pages and notebook reprs.

Event lists are built the way a run builds them, through ``Trajectory.emit`` (and read
back from the JSONL log with ``read_log``), and rendered to a plain ``rich`` console
writing into a string, so the tests assert on exactly the text a person would see.
"""

from __future__ import annotations

import io
import re
import threading
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from rlm.display import (
    BatchProgress,
    LiveDisplay,
    exec_result_html,
    exec_result_rich,
    render_log,
    result_html,
    result_rich,
    trajectory_fragment_html,
    trajectory_html,
)
from rlm.trajectory import Trajectory, read_log
from rlm.usage import Usage

SCRIPT = "<script>alert('pwned')</script>"
ROOT_USAGE = {"calls": 2, "prompt_tokens": 3234, "completion_tokens": 76, "total_tokens": 3310,
              "cost_usd": 0.0032}
SUB_USAGE = {"calls": 10, "prompt_tokens": 5000, "completion_tokens": 100, "total_tokens": 5100,
             "cost_usd": 0.0005}


def plain_console(width: int = 100) -> Console:
    return Console(file=io.StringIO(), width=width, force_terminal=False)


def text_of(console: Console) -> str:
    file = console.file
    assert isinstance(file, io.StringIO)
    return file.getvalue()


def emit_run(tr: Trajectory, *, finished: bool = True) -> None:
    """A two-iteration run: a batch of sub-queries, then an error, then FINAL."""
    tr.emit("run_start", query="Which ids appear twice?", context="str, 1,000,000 lines",
            model="gpt-4o", recursive_model="gpt-4o-mini", sandbox="local",
            max_iterations=20, max_depth=1)
    tr.emit("root_request", iteration=1, messages=[{"role": "system", "content": "You are an RLM."},
                                                     {"role": "user", "content": "Query: ids?"}])
    tr.emit("root_reply", iteration=1,
            content="Let me look at the context first.\n```repl\nprint(len(context))\n```\n",
            usage={"prompt_tokens": 1234, "completion_tokens": 56, "cost_usd": 0.0012}, elapsed_s=1.25)
    tr.emit("cell", iteration=1, index=0, code="print(len(context))\nanswers = llm_query_batch(chunks)\n")
    for done in (0, 4, 8, 10):
        tr.emit("subcalls", done=done, total=10)
    tr.emit("cell_result", iteration=1, index=0, stdout="1000000\n", stderr="slow chunk 3\n",
            error=None, final=None, duration_s=0.5, sub_calls=10, truncated=False)
    tr.emit("root_request", iteration=2, messages=[{"role": "user", "content": "output..."}])
    tr.emit("root_reply", iteration=2, content="```repl\nprint(undefined_name)\n```",
            usage={"prompt_tokens": 2000, "completion_tokens": 20, "cost_usd": 0.002}, elapsed_s=0.75)
    tr.emit("cell", iteration=2, index=0, code="print(undefined_name)\n")
    tr.emit("cell_result", iteration=2, index=0, stdout=f"echo {SCRIPT}\n", stderr="",
            error=f"NameError: name 'undefined_name' is not defined {SCRIPT}", final=None,
            duration_s=0.001, sub_calls=0, truncated=False)
    if not finished:
        return
    tr.emit("cell", iteration=2, index=1, code="FINAL('ids 17 and 42')\n")
    tr.emit("cell_result", iteration=2, index=1, stdout="", stderr="", error=None,
            final="ids 17 and 42", duration_s=0.002, sub_calls=0, truncated=False)
    tr.emit("final", answer="ids 17 and 42", source="code")
    tr.emit("run_end", answer="ids 17 and 42", stopped_reason="final", iterations=2, elapsed_s=4.5,
            sub_calls=10, usage={"root": ROOT_USAGE, "sub": SUB_USAGE}, error=None)


@pytest.fixture
def logged_run(tmp_path: Path) -> tuple[Trajectory, list[dict[str, Any]]]:
    """A finished run's trajectory and its events read back from the JSONL log."""
    tr = Trajectory(log_dir=tmp_path)
    emit_run(tr)
    tr.close()
    assert tr.log_path is not None
    return tr, read_log(tr.log_path)


# -- the live view ---------------------------------------------------------------------


def test_live_view_shows_root_text_code_outputs_and_errors(tmp_path: Path) -> None:
    console = plain_console()
    emit_run(Trajectory(log_dir=tmp_path, sinks=[LiveDisplay(console)]))
    out = text_of(console)
    assert "Which ids appear twice?" in out
    assert "Let me look at the context first." in out
    assert "print(len(context))" in out and "llm_query_batch(chunks)" in out
    assert "1000000" in out
    assert "slow chunk 3" in out
    assert "NameError: name 'undefined_name' is not defined" in out
    assert "iteration 1" in out and "iteration 2" in out
    # Untrusted output is printed as text, never read as rich markup.
    assert SCRIPT in out


def test_live_view_shows_tokens_cost_and_time_per_iteration(tmp_path: Path) -> None:
    console = plain_console()
    emit_run(Trajectory(log_dir=tmp_path, sinks=[LiveDisplay(console)]))
    out = text_of(console)
    assert "1,234 → 56 tokens · $0.0012 · 1.25 s" in out
    assert "2,000 → 20 tokens · $0.0020 · 0.75 s" in out
    assert "cell 1 · 0.50 s · 10 sub-calls" in out


def test_live_view_shows_sub_query_progress_numbers(tmp_path: Path) -> None:
    console = plain_console()
    emit_run(Trajectory(log_dir=tmp_path, sinks=[LiveDisplay(console)]))
    out = text_of(console)
    assert "sub-queries 10/10" in out
    # A plain file gets one line per batch, when it is done: no start, no line per update.
    assert "sub-queries 0/10" not in out and "4/10" not in out and "8/10" not in out


def test_live_view_ends_with_the_answer_panel_and_key_numbers(tmp_path: Path) -> None:
    console = plain_console(width=120)
    emit_run(Trajectory(log_dir=tmp_path, sinks=[LiveDisplay(console)]))
    out = text_of(console)
    tail = out[out.index("Answer"):]
    assert "ids 17 and 42" in tail
    assert "2 iterations · 10 sub-calls · 8,410 tokens · $0.0037 · 4.50 s · final" in tail


def test_live_view_reports_a_run_without_an_answer(tmp_path: Path) -> None:
    console = plain_console()
    tr = Trajectory(log_dir=tmp_path, sinks=[LiveDisplay(console)])
    tr.emit("run_start", query="q", model="m")
    tr.emit("budget", reason="max_cost_usd 0.01 reached")
    tr.emit("run_end", answer=None, stopped_reason="budget", iterations=1, elapsed_s=1.0,
            sub_calls=0, error="max_cost_usd 0.01 reached")
    out = text_of(console)
    assert "budget: max_cost_usd 0.01 reached" in out
    assert "no answer (budget)" in out


def test_live_view_cuts_long_outputs_to_head_and_tail(tmp_path: Path) -> None:
    console = plain_console()
    tr = Trajectory(log_dir=tmp_path, sinks=[LiveDisplay(console, max_output_lines=10)])
    stdout = "\n".join(f"row {i}" for i in range(1000))
    tr.emit("cell_result", iteration=1, index=0, stdout=stdout, duration_s=0.1)
    out = text_of(console)
    assert "row 0" in out and "row 999" in out
    assert "row 500" not in out
    assert "lines omitted" in out


def test_live_view_survives_unknown_events_and_missing_fields(tmp_path: Path) -> None:
    console = plain_console()
    sink = LiveDisplay(console)
    tr = Trajectory(log_dir=tmp_path, sinks=[sink])
    tr.emit("something_new", payload={"x": 1})
    tr.emit("root_reply", iteration=1)
    tr.emit("root_reply", iteration="two", usage="not a dict", content=None)
    tr.emit("cell")
    tr.emit("cell_result")
    tr.emit("subcalls")
    tr.emit("subcalls", done="?", total=None)
    tr.emit("run_end")
    sink({"no type": True})
    sink("not even a dict")  # type: ignore[arg-type]
    # A sink that raised would have been dropped by the trajectory.
    assert sink in tr.sinks
    tr.emit("error", message="still rendering")
    assert "still rendering" in text_of(console)


def test_live_view_from_many_threads_keeps_each_event_whole(tmp_path: Path) -> None:
    console = plain_console()
    tr = Trajectory(log_dir=tmp_path, sinks=[LiveDisplay(console)])
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            barrier.wait()
            for i in range(20):
                lines = "\n".join(f"T{n}-E{i}-L{k}" for k in range(5))
                tr.emit("cell_result", iteration=1, index=0, stdout=lines, duration_s=0.01)
                tr.emit("subcalls", done=i, total=20)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    lines = text_of(console).splitlines()
    for n in range(8):
        for i in range(20):
            at = lines.index(f"  T{n}-E{i}-L0")
            # The five lines of one event follow each other, whole.
            assert lines[at:at + 5] == [f"  T{n}-E{i}-L{k}" for k in range(5)]


def test_live_view_close_takes_down_an_unfinished_progress_bar(tmp_path: Path) -> None:
    console = Console(file=io.StringIO(), width=100, force_terminal=True)
    view = LiveDisplay(console)
    tr = Trajectory(log_dir=tmp_path, sinks=[view])
    tr.emit("subcalls", done=3, total=10)
    # The bar is up while the batch runs: it hides the cursor until it is taken down.
    assert "\x1b[?25l" in text_of(console) and "\x1b[?25h" not in text_of(console)
    view.close()
    assert text_of(console).rstrip().endswith("\x1b[?25h")


def test_live_view_indents_child_runs_and_prefixes_their_depth(tmp_path: Path) -> None:
    console = plain_console()
    parent = Trajectory(log_dir=tmp_path, sinks=[LiveDisplay(console)])
    emit_child_run(parent)
    lines = text_of(console).splitlines()
    child_cell = next(line for line in lines if "child_code()" in line)
    assert child_cell.startswith("    ")
    assert any("[d1] ↳ sub-RLM asked: summarise chunk 7" in line for line in lines)
    assert any(line.startswith("    ") and "[d1] ↳ sub-RLM answer: chunk 7 says hi" in line
               for line in lines)


def emit_child_run(parent: Trajectory) -> None:
    """A parent run whose cell starts a child RLM, its events forwarded the way core does."""
    parent.emit("run_start", query="parent query", model="m")
    parent.emit("cell", iteration=1, index=0, code="llm_query('summarise chunk 7')\n")
    child = Trajectory(depth=1)

    def forward(event: dict[str, Any]) -> None:
        fields = {k: v for k, v in event.items() if k not in ("type", "t", "run_id")}
        parent.emit(event["type"], child_run=event["run_id"], **fields)

    child.sinks = [forward]
    child.emit("run_start", query="summarise chunk 7", model="m")
    child.emit("cell", iteration=1, index=0, code="child_code()\n")
    child.emit("cell_result", iteration=1, index=0, stdout="child out\n", duration_s=0.1)
    child.emit("run_end", answer="chunk 7 says hi", stopped_reason="final", iterations=1,
               elapsed_s=0.2, sub_calls=0)
    parent.emit("cell_result", iteration=1, index=0, stdout="parent out\n", duration_s=0.3, sub_calls=1)
    parent.emit("run_end", answer="done", stopped_reason="final", iterations=1, elapsed_s=0.5, sub_calls=1)


# -- rlm view LOG ----------------------------------------------------------------------


def test_render_log_replays_the_run_and_ends_with_a_metrics_table(
    logged_run: tuple[Trajectory, list[dict[str, Any]]],
) -> None:
    _, events = logged_run
    console = plain_console()
    render_log(events, console)
    out = text_of(console)
    assert "print(len(context))" in out and "NameError" in out and "ids 17 and 42" in out
    table = out[out.index("Metrics"):]
    for label, value in [("Iterations", "2"), ("Root calls", "2"), ("Root tokens", "3,310"),
                         ("Root cost", "$0.0032"), ("Sub-calls", "10"), ("Sub tokens", "5,100"),
                         ("Sub cost", "$0.0005"), ("Wall time", "4.50 s"), ("Stopped", "final")]:
        assert re.search(rf"{re.escape(label)}\s+{re.escape(value)}", table), label


def test_render_log_looks_like_the_live_view(
    tmp_path: Path, logged_run: tuple[Trajectory, list[dict[str, Any]]]
) -> None:
    _, events = logged_run
    live = plain_console()
    emit_run(Trajectory(log_dir=tmp_path / "again", sinks=[LiveDisplay(live)]))
    replay = plain_console()
    render_log(events, replay)
    live_text = text_of(live)
    replay_text = text_of(replay)
    # The same run, minus the live-only progress lines, plus the table at the end.
    without_progress = "\n".join(
        line for line in live_text.splitlines() if not line.startswith("sub-queries")
    )
    assert replay_text.startswith(without_progress)


def test_render_log_of_a_killed_run_says_it_is_incomplete(tmp_path: Path) -> None:
    tr = Trajectory(log_dir=tmp_path)
    emit_run(tr, finished=False)
    tr.close()
    assert tr.log_path is not None
    with tr.log_path.open("a", encoding="utf-8") as fh:
        fh.write('{"type": "cell", "iteration": 3, "cod')  # torn last line of a killed run
    console = plain_console()
    render_log(read_log(tr.log_path), console)
    out = text_of(console)
    assert "NameError" in out
    assert re.search(r"Root tokens\s+3,310", out)  # summed from the two root replies
    assert re.search(r"Stopped\s+incomplete \(no run_end\)", out)


# -- HTML ------------------------------------------------------------------------------


class TagChecker(HTMLParser):
    """Checks that every opened non-void element is closed in order."""

    VOID = {"meta", "br", "hr", "img", "input", "link", "wbr", "col", "area", "base", "source"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.counts: dict[str, int] = {}
        self.problems: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.counts[tag] = self.counts.get(tag, 0) + 1
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def check_html(page: str) -> TagChecker:
    checker = TagChecker()
    checker.feed(page)
    checker.close()
    assert checker.problems == []
    assert checker.stack == []
    return checker


def test_html_page_is_one_self_contained_document(
    logged_run: tuple[Trajectory, list[dict[str, Any]]],
) -> None:
    _, events = logged_run
    page = trajectory_html(events, title="My run")
    assert page.startswith("<!DOCTYPE html>")
    assert "<title>My run</title>" in page
    assert not re.search(r"\b(src|href)\s*=", page, re.IGNORECASE)
    assert "<script" not in page.lower()
    assert "<link" not in page.lower() and "@import" not in page
    checker = check_html(page)
    assert checker.counts["html"] == 1 and checker.counts["head"] == 1


def test_html_escapes_model_and_code_output(
    logged_run: tuple[Trajectory, list[dict[str, Any]]],
) -> None:
    _, events = logged_run
    page = trajectory_html(events)
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in page
    # The parsed text holds the script as words to read.
    assert SCRIPT in "".join(check_html(page).text)


def test_html_escapes_code_and_root_text(tmp_path: Path) -> None:
    tr = Trajectory(log_dir=tmp_path)
    tr.emit("run_start", query="<b>q</b>", model="m")
    tr.emit("root_reply", iteration=1, content=f"I will print {SCRIPT}\n```repl\nprint('</pre>{SCRIPT}')\n```")
    tr.emit("cell", iteration=1, index=0, code=f"print('</pre>{SCRIPT}')\n")
    tr.emit("run_end", answer=f"answer {SCRIPT}", stopped_reason="final", iterations=1)
    page = trajectory_html(tr.events)
    assert "<script" not in page.lower()
    assert "<b>q</b>" not in page
    check_html(page)


def test_html_puts_the_answer_before_the_metrics_and_the_iterations(
    logged_run: tuple[Trajectory, list[dict[str, Any]]],
) -> None:
    _, events = logged_run
    page = trajectory_html(events)
    answer = page.index("ids 17 and 42")
    metrics = page.index("Root tokens")
    iteration = page.index("Iteration 1")
    assert answer < metrics < iteration
    assert page.index("Iteration 1") < page.index("Iteration 2")


def test_html_has_collapsible_iterations_with_highlighted_code(
    logged_run: tuple[Trajectory, list[dict[str, Any]]],
) -> None:
    _, events = logged_run
    page = trajectory_html(events)
    checker = check_html(page)
    assert checker.counts["details"] == checker.counts["summary"]
    assert checker.counts["details"] >= 2 + 3  # two iterations, three cells' outputs
    # pygments with inline styles: the keyword `print` sits in a styled span.
    assert re.search(r'<span style="[^"]+">print</span>', page)
    assert "Let me look at the context first." in page


def test_html_shows_the_metrics_numbers(
    logged_run: tuple[Trajectory, list[dict[str, Any]]],
) -> None:
    _, events = logged_run
    text = " ".join("".join(check_html(trajectory_html(events)).text).split())
    for fragment in ["Iterations2", "Root calls2", "Root tokens3,310", "Root cost$0.0032",
                     "Sub-calls10", "Sub tokens5,100", "Sub cost$0.0005", "Total cost$0.0037",
                     "Wall time4.50 s", "Stoppedfinal"]:
        assert fragment in text, fragment


def test_html_fragment_has_no_document_wrapper(
    logged_run: tuple[Trajectory, list[dict[str, Any]]],
) -> None:
    _, events = logged_run
    fragment = trajectory_fragment_html(events)
    assert "<html" not in fragment and "<head" not in fragment and "<body" not in fragment
    assert "ids 17 and 42" in fragment and "<details" in fragment
    check_html(fragment)


def test_html_nests_a_child_run_inside_the_cell_that_started_it(tmp_path: Path) -> None:
    parent = Trajectory(log_dir=tmp_path)
    emit_child_run(parent)
    page = trajectory_html(parent.events)
    check_html(page)
    cell = page.index("cell 1 · 0.30 s · 1 sub-call")  # the parent's cell
    child = page.index("sub-RLM (depth 1)")
    parent_output = page.index("parent out")
    assert cell < child < parent_output
    assert "child out" in page and "chunk 7 says hi" in page


def test_html_of_odd_events_still_renders(tmp_path: Path) -> None:
    tr = Trajectory(log_dir=tmp_path)
    tr.emit("mystery")
    tr.emit("cell_result", iteration=1)
    tr.emit("root_reply", iteration=1, usage=None, content=None)
    tr.emit("root_request", iteration=2, messages="not a list")
    check_html(trajectory_html(tr.events))
    check_html(trajectory_html([]))


# -- notebook and terminal reprs --------------------------------------------------------


def make_result(events: list[dict[str, Any]]) -> SimpleNamespace:
    return SimpleNamespace(
        answer="ids 17 and 42",
        iterations=2,
        elapsed_s=4.5,
        usage={"root": Usage(**ROOT_USAGE), "sub": Usage(**SUB_USAGE)},
        sub_calls=10,
        stopped_reason="final",
        error=None,
        trajectory=events,
        log_path="/tmp/rlm-run.jsonl",
    )


def test_result_html_shows_answer_metrics_then_iterations(
    logged_run: tuple[Trajectory, list[dict[str, Any]]],
) -> None:
    tr, _ = logged_run
    page = result_html(make_result(tr.events))
    checker = check_html(page)
    text = " ".join("".join(checker.text).split())
    assert text.index("ids 17 and 42") < text.index("Root tokens3,310") < text.index("Iteration 1")
    assert "Sub cost$0.0005" in text and "Log/tmp/rlm-run.jsonl" in text
    assert "<script" not in page.lower()


def test_result_html_works_without_a_trajectory() -> None:
    bare = SimpleNamespace(answer=None, stopped_reason="error", error="no API key <set it>")
    page = result_html(bare)
    check_html(page)
    assert "No answer (error)" in page and "no API key &lt;set it&gt;" in page


def test_result_rich_shows_the_answer_and_the_numbers(
    logged_run: tuple[Trajectory, list[dict[str, Any]]],
) -> None:
    tr, _ = logged_run
    console = plain_console(width=120)
    console.print(result_rich(make_result(tr.events)))
    out = text_of(console)
    assert "ids 17 and 42" in out
    assert re.search(r"Sub-calls\s+10", out) and re.search(r"Total cost\s+\$0\.0037", out)


def exec_result(**fields: Any) -> SimpleNamespace:
    base: dict[str, Any] = {"stdout": "", "stderr": "", "error": None, "final": None,
                            "duration_s": 0.0123, "sub_calls": 0, "truncated": False}
    return SimpleNamespace(**(base | fields))


def test_exec_result_html_shows_every_output_escaped() -> None:
    r = exec_result(stdout=f"out {SCRIPT}\n", stderr="careful\n", error="ValueError: bad",
                    final="the answer", sub_calls=3, truncated=True)
    page = exec_result_html(r)
    check_html(page)
    assert "<script" not in page.lower() and "out &lt;script&gt;" in page
    for piece in ["careful", "ValueError: bad", "FINAL → the answer", "12 ms", "3 sub-calls",
                  "output truncated"]:
        assert piece in page, piece


def test_exec_result_rich_shows_outputs_and_status() -> None:
    console = plain_console()
    console.print(exec_result_rich(exec_result(stdout="hello [bold]x[/bold]\n", error="boom")))
    out = text_of(console)
    assert "hello [bold]x[/bold]" in out  # printed as text, not read as markup
    assert "boom" in out and "12 ms" in out and "error" in out


def test_exec_result_reprs_tolerate_a_bare_object() -> None:
    check_html(exec_result_html(object()))
    console = plain_console()
    console.print(exec_result_rich(object()))
    assert "(no output)" in text_of(console)


# -- batch progress --------------------------------------------------------------------


def test_batch_progress_in_a_file_prints_quarters_with_done_and_failed() -> None:
    console = plain_console()
    bar = BatchProgress("tasks", console)
    bar.start(100)
    for i in range(100):
        bar.advance(ok=i % 10 != 0)
    bar.stop()
    lines = text_of(console).splitlines()
    assert len(lines) == 5
    assert lines[0].startswith("tasks 0/100")
    assert lines[-1].startswith("tasks 100/100 · 10 failed")
    assert (bar.done, bar.failed) == (100, 10)


def test_batch_progress_in_a_terminal_draws_a_bar_with_failures() -> None:
    console = Console(file=io.StringIO(), width=100, force_terminal=True)
    with BatchProgress("tasks", console) as bar:
        bar.start(4)
        for ok in (True, False, True, True):
            bar.advance(ok)
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text_of(console))
    assert "4/4" in out and "1 failed" in out


def test_batch_progress_is_thread_safe() -> None:
    bar = BatchProgress("tasks", plain_console())
    bar.start(800)
    threads = [threading.Thread(target=lambda: [bar.advance(True) for _ in range(100)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.stop()
    assert bar.done == 800 and bar.failed == 0


@pytest.fixture
def ipython_shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A real IPython shell, so displays go through IPython's display machinery."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    created = not InteractiveShell.initialized()
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)
    yield shell
    if created:
        InteractiveShell.clear_instance()


def test_batch_progress_in_a_notebook_is_one_output_updated_in_place(ipython_shell: Any) -> None:
    from IPython.utils.capture import capture_output

    console = Console(file=io.StringIO(), force_jupyter=True)
    with capture_output() as captured:
        bar = BatchProgress("tasks", console)
        bar.start(1000)
        for i in range(1000):
            bar.advance(ok=i % 100 != 0)
        bar.stop()
    outputs = captured.outputs
    assert sum(1 for o in outputs if not o.update) == 1
    # Throttled: far fewer messages than updates, and the last one is the final state.
    assert len(outputs) < 100
    assert outputs[-1].data["text/plain"].startswith("tasks 1,000/1,000 · 10 failed")
    assert '<progress value="1000" max="1000"' in outputs[-1].data["text/html"]


def test_batch_progress_in_a_notebook_catches_up_after_a_burst(ipython_shell: Any) -> None:
    from IPython.utils.capture import capture_output

    console = Console(file=io.StringIO(), force_jupyter=True)
    with capture_output() as captured:
        bar = BatchProgress("tasks", console, refresh_s=0.05)
        bar.start(10)
        for _ in range(3):
            bar.advance(True)
        # No more updates come; the throttled state must still reach the output.
        deadline = time.monotonic() + 10
        while not captured.outputs[-1].data["text/plain"].startswith("tasks 3/10"):
            assert time.monotonic() < deadline, captured.outputs[-1].data["text/plain"]
            time.sleep(0.01)
        bar.stop()


def test_live_view_in_a_notebook_keeps_a_batch_in_one_output(
    ipython_shell: Any, tmp_path: Path
) -> None:
    from IPython.utils.capture import capture_output

    console = Console(file=io.StringIO(), force_jupyter=True)
    tr = Trajectory(log_dir=tmp_path, sinks=[LiveDisplay(console)])
    with capture_output() as captured:
        tr.emit("cell", iteration=1, index=0, code="llm_query_batch(chunks)")
        for done in range(501):
            tr.emit("subcalls", done=done, total=500)
        tr.emit("cell_result", iteration=1, index=0, stdout="ok", sub_calls=500, duration_s=1.0)
    progress = [o for o in captured.outputs if "sub-queries" in o.data.get("text/plain", "")]
    assert sum(1 for o in progress if not o.update) == 1
    assert len(progress) < 50
    assert progress[-1].data["text/plain"].startswith("sub-queries 500/500")


# -- sub-queries, cell numbers, the page's first screen ----------------------------------


def emit_run_with_sub_queries(tr: Trajectory) -> None:
    tr.emit("run_start", query="Which chunk mentions the walrus?", model="m", max_iterations=5)
    for iteration in (1, 2, 3):
        tr.emit("root_reply", iteration=iteration, content=f"Step {iteration}.\n```repl\nstep_{iteration}()\n```")
        tr.emit("cell", iteration=iteration, index=0, code=f"step_{iteration}()\n")
        if iteration == 1:
            tr.emit("sub_queries", iteration=1, calls=[
                {"prompt": "Does this chunk mention a walrus? chunk 0 text", "reply": "no"},
                {"prompt": "Does this chunk mention a walrus? chunk 1 <b>text</b>", "reply": "YES: the walrus"},
            ])
        tr.emit("cell_result", iteration=iteration, index=0, stdout="ok\n", duration_s=0.1,
                sub_calls=2 if iteration == 1 else 0)
    tr.emit("final", answer="chunk 1", source="code")
    tr.emit("run_end", answer="chunk 1", stopped_reason="final", iterations=3, elapsed_s=1.0, sub_calls=2)


def test_cells_are_numbered_across_the_run(tmp_path: Path) -> None:
    console = plain_console()
    tr = Trajectory(sinks=[LiveDisplay(console)])
    emit_run_with_sub_queries(tr)
    out = text_of(console)
    assert "cell 1" in out and "cell 2" in out and "cell 3" in out
    assert "(code → cell 3)" in out
    page = trajectory_html(tr.events)
    assert "cell 3 · " in page and "(code → cell 2)" in page


def test_html_shows_sub_queries_folded_under_their_cell_with_a_filter_box(tmp_path: Path) -> None:
    tr = Trajectory(log_dir=tmp_path)
    emit_run_with_sub_queries(tr)
    page = trajectory_html(read_log(tr.log_path))
    check_html(page)
    cell_1, cell_2 = page.index("cell 1 · "), page.index("cell 2 · ")
    sub = page.index("Does this chunk mention a walrus? chunk 1")
    assert cell_1 < sub < cell_2
    assert page.count('class="rlm-subq"') == 2
    assert "sub-queries (2 recorded)" in page
    assert "&lt;b&gt;text&lt;/b&gt;" in page and "<b>text</b>" not in page  # escaped
    assert 'id="rlm-filter"' in page and "<script>" in page
    assert not re.search(r"\b(src|href)\s*=", page, re.IGNORECASE)


def test_html_without_sub_queries_has_no_script(logged_run: tuple[Trajectory, list[dict[str, Any]]]) -> None:
    _, events = logged_run
    assert "<script" not in trajectory_html(events).lower()


def test_html_opens_the_first_and_the_final_iterations_and_is_titled_with_the_query(tmp_path: Path) -> None:
    tr = Trajectory()
    emit_run_with_sub_queries(tr)
    page = trajectory_html(tr.events)
    assert "<title>Which chunk mentions the walrus? · RLM trajectory</title>" in page
    iterations = re.findall(r"<details( open)?[^>]*><summary[^>]*>Iteration (\d)", page)
    # Three iterations: the first two and the last (the answer) are all open.
    assert iterations == [(" open", "1"), (" open", "2"), (" open", "3")]


def test_html_of_a_failed_run_shows_its_error_once(tmp_path: Path) -> None:
    tr = Trajectory()
    tr.emit("run_start", query="q", model="m")
    tr.emit("error", message="LLMError: the server said 500 after 3 attempts")
    tr.emit("run_end", answer=None, stopped_reason="error", iterations=0, elapsed_s=0.1,
            error="LLMError: the server said 500 after 3 attempts")
    page = trajectory_html(tr.events)
    assert page.count("the server said 500") == 1


def test_rlm_view_lists_the_first_sub_queries_under_their_cell(tmp_path: Path) -> None:
    tr = Trajectory(log_dir=tmp_path)
    emit_run_with_sub_queries(tr)
    console = plain_console(120)
    render_log(read_log(tr.log_path), console)
    out = text_of(console)
    assert out.index("step_1()") < out.index("YES: the walrus") < out.index("step_2()")


def test_the_footer_keeps_the_stop_reason_at_a_narrow_width() -> None:
    console = plain_console(40)
    tr = Trajectory(sinks=[LiveDisplay(console)])
    tr.emit("run_start", query="q", model="m", max_iterations=1)
    tr.emit("root_reply", iteration=1, content="```repl\nx = 1\n```")
    tr.emit("root_reply", iteration=2, content="my guess")
    tr.emit("final", answer="my guess", source="last_turn")
    tr.emit("run_end", answer="my guess", stopped_reason="max_iterations", iterations=1, elapsed_s=0.5,
            sub_calls=1)
    out = text_of(console)
    assert "max_iterations" in out.replace("\n", "")
    assert "iteration limit 1 reached" in out
    assert "✓ final answer" not in out


def test_a_child_run_is_indented_at_full_width_without_a_stray_rule(tmp_path: Path) -> None:
    console = plain_console(80)
    parent = Trajectory(sinks=[LiveDisplay(console)])
    parent.emit("run_start", query="parent query", model="m")
    parent.emit("cell", iteration=1, index=0, code="llm_query('summarise chunk 7')\n")
    parent.emit("run_start", child_run="c1", depth=1, query="generic child instruction",
                prompt="summarise chunk 7", model="m")
    parent.emit("root_reply", child_run="c1", depth=1, iteration=1, content="```repl\nFINAL('x')\n```")
    parent.emit("cell", child_run="c1", depth=1, iteration=1, index=0, code="FINAL('x')\n")
    lines = text_of(console).splitlines()
    assert any("[d1] ↳ sub-RLM asked: summarise chunk 7" in line for line in lines)
    assert not any("generic child instruction" in line for line in lines)
    rule = next(line for line in lines if "[d1] iteration 1" in line)
    assert rule.startswith("    ") and len(rule) == 80 and rule.endswith("─")
    child_cell_top = next(line for line in lines if "[d1] cell 1" in line)
    parent_cell_top = next(line for line in lines if line.startswith("╭─ cell 1"))
    assert len(child_cell_top) == len(parent_cell_top) == 80  # same right edge
    assert not any(line.strip() == "─" for line in lines)
    assert all(line == line.rstrip() for line in lines)  # no trailing padding


def test_html_marks_an_iteration_limit_stop_instead_of_a_clean_answer() -> None:
    tr = Trajectory()
    tr.emit("run_start", query="q", model="m", max_iterations=1)
    tr.emit("root_reply", iteration=2, content="my guess")
    tr.emit("final", answer="my guess", source="last_turn")
    tr.emit("run_end", answer="my guess", stopped_reason="max_iterations", iterations=1, elapsed_s=0.5)
    page = trajectory_html(tr.events)
    assert "iteration limit reached, no FINAL" in page
    assert "no FINAL before the iteration limit" in page
    assert "✓ final answer" not in page
