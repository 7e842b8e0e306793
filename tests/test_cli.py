"""The `rlm` command through a subprocess: run, demo, view, and its exit codes."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlm.cli import build_parser
from rlm.testing import FakeLLMServer

ROOT = "cli-root"


def rlm_cmd(*args: str, env: dict[str, str] | None = None, stdin: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "RLM_"))}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "rlm.cli", *args], capture_output=True, text=True,
        env=full_env, input=stdin, timeout=timeout,
    )


@pytest.fixture
def root_server() -> Iterator[FakeLLMServer]:
    script = [
        "Looking.\n```repl\nprint(len(context.splitlines()))\n```",
        "```repl\nFINAL(str(len(context.splitlines())) + ' lines')\n```",
    ]
    with FakeLLMServer(scripts={ROOT: script}) as srv:
        yield srv


def test_run_prints_the_answer(tmp_path: Path, root_server: FakeLLMServer) -> None:
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("a\nb\nc\n")
    proc = rlm_cmd("run", "--context", str(ctx), "--query", "how many lines?", "--model", ROOT,
                   "--base-url", root_server.url, "--api-key", "k", "--sandbox", "local")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "3 lines"


def test_run_reads_stdin_and_prints_json(root_server: FakeLLMServer, tmp_path: Path) -> None:
    proc = rlm_cmd("run", "--context", "-", "--query", "q", "--model", ROOT, "--base-url",
                   root_server.url, "--json", "--log-dir", str(tmp_path), "--sandbox", "local",
                   env={"OPENAI_API_KEY": "k"}, stdin="x\ny\n")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["answer"] == "2 lines"
    assert data["stopped_reason"] == "final"
    assert data["iterations"] == 2
    assert Path(data["log_path"]).exists()


def test_a_failed_run_exits_1(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("x")
    # nothing listens on port 9 of loopback: the root model can never be reached
    proc = rlm_cmd("run", "--context", str(ctx), "--query", "q", "--base-url",
                   "http://127.0.0.1:9/v1", "--api-key", "k", "--sandbox", "local")
    assert proc.returncode == 1
    assert "run failed (error)" in proc.stderr
    assert "cannot connect to http://127.0.0.1:9/v1" in proc.stderr


def test_missing_file_is_a_usage_error() -> None:
    proc = rlm_cmd("run", "--context", "/no/such/file.txt", "--query", "q", "--api-key", "k")
    assert proc.returncode == 2
    assert "not found: /no/such/file.txt" in proc.stderr


def test_undecodable_file_is_a_usage_error(tmp_path: Path) -> None:
    ctx = tmp_path / "bin.dat"
    ctx.write_bytes(b"ok\xff\xfe\x00")
    proc = rlm_cmd("run", "--context", str(ctx), "--query", "q", "--api-key", "k")
    assert proc.returncode == 2
    assert "not valid utf-8 text" in proc.stderr and "--encoding" in proc.stderr


def test_missing_key_is_a_usage_error(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("x")
    proc = rlm_cmd("run", "--context", str(ctx), "--query", "q")
    assert proc.returncode == 2
    assert "OPENAI_API_KEY" in proc.stderr and "--api-key" in proc.stderr


def test_bad_option_is_a_usage_error() -> None:
    proc = rlm_cmd("run", "--context", "x", "--query", "q", "--max-iterations", "lots")
    assert proc.returncode == 2


def test_demo_finds_the_needle_offline(tmp_path: Path) -> None:
    proc = rlm_cmd("demo", "--lines", "200000", "--latency", "0.1", "--log-dir", str(tmp_path),
                   "--sandbox", "local", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "correct" in proc.stdout
    assert "sub-queries:  20" in proc.stdout
    assert "FINAL_VAR" in proc.stdout  # the live trajectory shows the code
    logs = list(tmp_path.glob("rlm-*.jsonl"))
    assert len(logs) == 1

    view = rlm_cmd("view", str(logs[0]))
    assert view.returncode == 0, view.stderr
    assert "llm_query_batch" in view.stdout

    out = tmp_path / "run.html"
    html = rlm_cmd("view", str(logs[0]), "--html", str(out))
    assert html.returncode == 0, html.stderr
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") or page.lower().startswith("<!doctype html>")
    assert "llm_query_batch" in page


def test_view_of_a_missing_log_is_a_usage_error() -> None:
    proc = rlm_cmd("view", "/no/such/log.jsonl")
    assert proc.returncode == 2


# -- usage errors: exit 2, one line on stderr, never a traceback -------------------------


def assert_usage_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def ctx_file(tmp_path: Path) -> Path:
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("a\nb\nc\n")
    return ctx


def test_an_unknown_encoding_is_a_usage_error(ctx_file: Path) -> None:
    proc = rlm_cmd("run", "--context", str(ctx_file), "--query", "q", "--api-key", "k",
                   "--encoding", "nope")
    assert_usage_error(proc, "--encoding nope", "unknown text encoding")


def test_an_unwritable_log_dir_is_refused_before_the_context_is_read() -> None:
    # The context does not even exist: the log dir is checked first, so a big context is
    # never loaded just to fail afterwards.
    proc = rlm_cmd("run", "--context", "/no/such/ctx.txt", "--query", "q", "--api-key", "k",
                   "--log-dir", "/proc/nope")
    assert_usage_error(proc, "--log-dir /proc/nope", "cannot write there")


def test_a_log_dir_that_is_a_file_is_refused(ctx_file: Path) -> None:
    proc = rlm_cmd("run", "--context", str(ctx_file), "--query", "q", "--api-key", "k",
                   "--log-dir", str(ctx_file))
    assert_usage_error(proc, "not a directory")


def test_an_empty_context_file_is_refused_unless_allowed(tmp_path: Path,
                                                         root_server: FakeLLMServer) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = rlm_cmd("run", "--context", str(empty), "--query", "q", "--api-key", "k")
    assert_usage_error(proc, "is empty", "--allow-empty")
    assert root_server.requests_log == []
    allowed = rlm_cmd("run", "--context", str(empty), "--query", "q", "--api-key", "k", "--model", ROOT,
                      "--base-url", root_server.url, "--sandbox", "local", "--allow-empty")
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.strip() == "0 lines"


def test_a_context_that_is_a_directory_is_a_usage_error(tmp_path: Path) -> None:
    proc = rlm_cmd("run", "--context", str(tmp_path), "--query", "q", "--api-key", "k")
    assert_usage_error(proc, "not a directory")


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--max-time-s", "-5", "must be a number > 0"),
        ("--max-cost-usd", "0", "must be a number > 0"),
        ("--max-tokens", "-1", "must be at least 1"),
        ("--max-iterations", "0", "must be at least 1"),
        ("--max-iterations", "lots", "expected a whole number"),
        ("--max-depth", "0", "must be at least 1"),
        ("--max-concurrency", "0", "must be at least 1"),
        ("--base-url", "localhost:8000", "http:// or https://"),
        ("--sandbox", "docker", "invalid choice"),
    ],
)
def test_bad_flag_values_name_the_flag(ctx_file: Path, flag: str, value: str, needle: str) -> None:
    proc = rlm_cmd("run", "--context", str(ctx_file), "--query", "q", "--api-key", "k", flag, value)
    assert_usage_error(proc, f"argument {flag}", needle)
    assert "max_" not in proc.stderr  # a flag name, not a Python parameter name


def test_an_empty_query_is_a_usage_error(ctx_file: Path) -> None:
    proc = rlm_cmd("run", "--context", str(ctx_file), "--query", "  ", "--api-key", "k")
    assert_usage_error(proc, "--query is empty")


def test_view_of_a_directory_is_a_usage_error(tmp_path: Path) -> None:
    assert_usage_error(rlm_cmd("view", str(tmp_path)), "is a directory")


def test_view_of_a_binary_file_is_a_usage_error(tmp_path: Path) -> None:
    blob = tmp_path / "x.jsonl"
    blob.write_bytes(bytes(range(256)) * 4)
    assert_usage_error(rlm_cmd("view", str(blob)), "not a text file")


def test_view_of_json_that_is_not_a_trajectory_is_a_usage_error(tmp_path: Path) -> None:
    other = tmp_path / "other.jsonl"
    other.write_text('{"id": 1, "text": "hello"}\n{"id": 2, "text": "world"}\n[1, 2]\n')
    assert_usage_error(rlm_cmd("view", str(other)), "not an rlm trajectory")


@pytest.fixture
def log_file(tmp_path: Path, root_server: FakeLLMServer, ctx_file: Path) -> Path:
    logs = tmp_path / "logs"
    proc = rlm_cmd("run", "--context", str(ctx_file), "--query", "how many lines?", "--model", ROOT,
                   "--base-url", root_server.url, "--api-key", "k", "--sandbox", "local",
                   "--log-dir", str(logs))
    assert proc.returncode == 0, proc.stderr
    return next(logs.glob("rlm-*.jsonl"))


def test_view_html_into_a_missing_directory_is_a_usage_error(log_file: Path) -> None:
    proc = rlm_cmd("view", str(log_file), "--html", "/nonexistent/x.html")
    assert_usage_error(proc, "--html /nonexistent/x.html", "does not exist")


def test_view_html_onto_a_directory_is_a_usage_error(log_file: Path, tmp_path: Path) -> None:
    proc = rlm_cmd("view", str(log_file), "--html", str(tmp_path))
    assert_usage_error(proc, "is a directory")


def test_view_piped_into_a_closed_reader_exits_quietly(log_file: Path) -> None:
    # `rlm view LOG | head -1`: the reader leaves early; no BrokenPipeError traceback.
    proc = subprocess.run(f"{sys.executable} -m rlm view {log_file} | head -1", shell=True,
                          capture_output=True, text=True, timeout=60)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


# -- output formats -------------------------------------------------------------------


def test_verbose_json_keeps_stdout_pure_json(ctx_file: Path, root_server: FakeLLMServer) -> None:
    proc = rlm_cmd("run", "--context", str(ctx_file), "--query", "q", "--model", ROOT, "--base-url",
                   root_server.url, "--api-key", "k", "--sandbox", "local", "--verbose", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["answer"] == "3 lines"
    assert "iteration 1" in proc.stderr and "cell 2" in proc.stderr  # the live view, on stderr


def test_verbose_prints_the_answer_once_on_stdout(ctx_file: Path, root_server: FakeLLMServer) -> None:
    proc = rlm_cmd("run", "--context", str(ctx_file), "--query", "q", "--model", ROOT, "--base-url",
                   root_server.url, "--api-key", "k", "--sandbox", "local", "-v")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "3 lines\n"


def test_context_format_flag_and_its_old_spelling(tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_text('["x", "y"]')
    for flag in ("--context-format", "--format"):
        with FakeLLMServer(scripts={ROOT: ["```repl\nFINAL(type(context).__name__)\n```"]}) as srv:
            proc = rlm_cmd("run", "--context", str(data), "--query", "q", "--model", ROOT, "--base-url",
                           srv.url, "--api-key", "k", "--sandbox", "local", flag, "json",
                           "--log-dir", str(tmp_path / flag))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "list"
        start = json.loads(next((tmp_path / flag).glob("*.jsonl")).read_text().splitlines()[0])
        assert start["context"].startswith("type: list, 2 items")
    helptext = rlm_cmd("run", "--help").stdout
    assert "--context-format" in helptext and "--format " not in helptext


def test_every_flag_has_help_and_shows_its_default() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"rlm {name} {action.dest} has no help"
            takes_value = action.option_strings and action.nargs != 0 and not action.required
            if takes_value:
                assert "(default:" in action.help, f"rlm {name} {action.option_strings[0]}"
    run_help = rlm_cmd("run", "--help").stdout
    assert "--max-tokens" in run_help and "--max-concurrency" in run_help


# -- the iteration limit ---------------------------------------------------------------


@pytest.fixture
def never_final_server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(scripts={ROOT: ["```repl\nprint(len(context))\n```"] * 2 + ["my best guess"]}) as srv:
        yield srv


@pytest.mark.parametrize("mode", ["plain", "json", "verbose"])
def test_the_iteration_limit_is_reported_in_every_mode(
    ctx_file: Path, never_final_server: FakeLLMServer, mode: str
) -> None:
    extra = {"plain": [], "json": ["--json"], "verbose": ["-v"]}[mode]
    proc = rlm_cmd("run", "--context", str(ctx_file), "--query", "q", "--model", ROOT, "--base-url",
                   never_final_server.url, "--api-key", "k", "--sandbox", "local",
                   "--max-iterations", "2", *extra)
    assert proc.returncode == 3, proc.stderr
    assert "iteration limit (--max-iterations 2)" in proc.stderr
    if mode == "json":
        data = json.loads(proc.stdout)
        assert data["stopped_reason"] == "max_iterations"
        assert data["answer"] == "my best guess"
    else:
        assert proc.stdout.strip() == "my best guess"
    if mode == "verbose":
        assert "iteration limit 2 reached" in proc.stderr
        assert "no FINAL" in proc.stderr
        assert "✓ final answer" not in proc.stderr  # not the green success line
        assert "iteration 3" not in proc.stderr


@pytest.mark.parametrize("width", [40, 60, 80, 120])
def test_the_answer_footer_keeps_the_stop_reason_at_any_width(
    ctx_file: Path, never_final_server: FakeLLMServer, width: int
) -> None:
    proc = rlm_cmd("run", "--context", str(ctx_file), "--query", "q", "--model", ROOT, "--base-url",
                   never_final_server.url, "--api-key", "k", "--sandbox", "local",
                   "--max-iterations", "2", "-v", env={"COLUMNS": str(width)})
    assert "max_iterations" in proc.stderr


# -- demo, version, module entry point -------------------------------------------------


def test_demo_ends_with_a_view_command_that_works_as_printed(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "rlm", "demo", "--lines", "20000", "--latency", "0", "--log-dir",
         "logs", "--sandbox", "local", "--quiet"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env={**os.environ, "COLUMNS": "80"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.rstrip("\n").splitlines()[-1]
    assert last.startswith("view it with: ")
    command = last.removeprefix("view it with: ")
    assert "0x longer" not in proc.stdout
    view = subprocess.run(command, shell=True, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert view.returncode == 0, view.stderr
    assert "KILO" in view.stdout or "Answer" in view.stdout


def test_python_dash_m_rlm_version() -> None:
    proc = subprocess.run([sys.executable, "-m", "rlm", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0
    from rlm import __version__

    assert proc.stdout.strip() == f"rlm {__version__}"


COUNTED = {
    "type": "object",
    "properties": {"count": {"type": "integer"}, "ids": {"type": "array", "items": {"type": "string"}}},
    "required": ["count", "ids"],
}


def test_run_with_a_schema_prints_the_validated_json(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("id-a\nid-b\n")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(COUNTED))
    script = [
        "```repl\nFINAL({'count': 'two', 'ids': context.split()})\n```",
        "```repl\nids = context.split()\nFINAL({'count': len(ids), 'ids': ids})\n```",
    ]
    with FakeLLMServer(scripts={ROOT: script}) as srv:
        common = ("run", "--context", str(ctx), "--query", "which ids?", "--model", ROOT,
                  "--base-url", srv.url, "--api-key", "k", "--sandbox", "local", "--schema", str(schema))
        alone = rlm_cmd(*common)
        as_json = rlm_cmd(*common, "--json")
    assert alone.returncode == 0, alone.stderr
    assert json.loads(alone.stdout) == {"count": 2, "ids": ["id-a", "id-b"]}
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["output"] == {"count": 2, "ids": ["id-a", "id-b"]}
    assert data["iterations"] == 2


def test_run_whose_answer_never_matches_the_schema_exits_1(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("x")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(COUNTED))
    with FakeLLMServer(scripts={ROOT: ["```repl\nFINAL({'count': 'many'})\n```"]}) as srv:
        proc = rlm_cmd("run", "--context", str(ctx), "--query", "q", "--model", ROOT, "--base-url",
                       srv.url, "--api-key", "k", "--sandbox", "local", "--schema", str(schema))
    assert proc.returncode == 1
    assert "run failed (invalid_answer)" in proc.stderr and "$.ids: expected a value" in proc.stderr


def test_a_schema_file_that_is_not_a_json_schema_is_a_usage_error(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("x")
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "integr"}')
    proc = rlm_cmd("run", "--context", str(ctx), "--query", "q", "--api-key", "k", "--schema", str(bad))
    assert proc.returncode == 2
    assert "not a valid JSON Schema" in proc.stderr


def test_a_run_on_a_terminal_shows_a_progress_line_that_goes_away(ctx_file: Path) -> None:
    from pty_terminal import spawn

    script = ["```repl\nprint(llm_query('ECHO hi'))\n```", "```repl\nFINAL('done')\n```"]
    with FakeLLMServer(scripts={ROOT: script}, latency=0.4) as srv:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "RLM_"))}
        child = spawn(
            sys.executable,
            ["-m", "rlm", "run", "--context", str(ctx_file), "--query", "q", "--model", ROOT,
             "--base-url", srv.url, "--api-key", "k", "--sandbox", "local"],
            env={**env, "TERM": "xterm"}, dimensions=(24, 100), timeout=60,
        )
        screen = child.read()
        child.close()
    assert child.exitstatus == 0, screen
    assert "rlm · iteration 1/20 · waiting for the root model" in screen
    assert screen.rstrip().endswith("done")  # the answer, after the line was taken down


# -- bad places and busy ports: one line, exit 2 ---------------------------------------


@pytest.fixture
def tasks_file(tmp_path: Path) -> Path:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"id": "a", "query": "q", "context": "x"}\n')
    return tasks


@pytest.mark.parametrize(("out", "needle"), [
    ("file/x.jsonl", "is a file, not a directory"),
    (".", "is a directory; give a file name"),
    ("/proc/x.jsonl", "cannot be written"),
    ("/sys/x.jsonl", "cannot be written"),
])
def test_batch_out_where_no_file_can_be_written_is_a_usage_error(tasks_file: Path, out: str,
                                                                   needle: str) -> None:
    (tasks_file.parent / "file").write_text("not a directory")
    target = out if out.startswith("/") else str(tasks_file.parent / out)
    proc = rlm_cmd("batch", str(tasks_file), "--out", target, "--api-key", "k", "-q")
    assert_usage_error(proc, needle)


def test_serve_on_a_busy_port_is_a_usage_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = rlm_cmd("serve", "--port", str(port), "--api-key", "k")
    assert_usage_error(proc, f"cannot listen on 127.0.0.1:{port}", "--port")


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_serve_on_a_port_out_of_range_is_a_usage_error(port: str) -> None:
    assert_usage_error(rlm_cmd("serve", "--port", port, "--api-key", "k"), "argument --port",
                       "from 0 to 65535")


def test_mcp_http_on_a_port_out_of_range_is_a_usage_error() -> None:
    proc = rlm_cmd("mcp", "--http", "127.0.0.1:99999", "--api-key", "k")
    assert_usage_error(proc, "--http 127.0.0.1:99999", "from 0 to 65535")


def test_batch_on_a_ray_client_address_without_ray_client_says_what_to_install(
    tasks_file: Path, tmp_path: Path
) -> None:
    # Ray Client is grpcio: a grpc package that cannot be imported stands for its absence.
    shadow = tmp_path / "shadow" / "grpc"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no grpc here')\n")
    proc = rlm_cmd("batch", str(tasks_file), "--out", str(tmp_path / "o.jsonl"), "--api-key", "k",
                   "--backend", "ray", "--ray-address", "ray://127.0.0.1:10001",
                   env={"PYTHONPATH": str(shadow.parent)})
    assert_usage_error(proc, "--ray-address ray://127.0.0.1:10001", "rlm-sandbox[ray]")


# -- consistency -----------------------------------------------------------------------


def test_run_json_has_the_usage_total(ctx_file: Path, root_server: FakeLLMServer) -> None:
    proc = rlm_cmd("run", "--context", str(ctx_file), "--query", "q", "--model", ROOT, "--base-url",
                   root_server.url, "--api-key", "k", "--sandbox", "local", "--json")
    assert proc.returncode == 0, proc.stderr
    usage = json.loads(proc.stdout)["usage"]
    assert usage["total"]["calls"] == usage["root"]["calls"] + usage["sub"]["calls"] == 2
    assert usage["total"]["total_tokens"] == usage["root"]["total_tokens"] + usage["sub"]["total_tokens"]


def _costs(data: object) -> list[float]:
    if isinstance(data, dict):
        return [v for k, v in data.items() if k.endswith("_usd") and isinstance(v, float)] + [
            c for v in data.values() for c in _costs(v)]
    if isinstance(data, list):
        return [c for v in data for c in _costs(v)]
    return []


def test_costs_in_json_are_rounded_to_a_millionth_of_a_dollar(ctx_file: Path,
                                                               root_server: FakeLLMServer) -> None:
    proc = rlm_cmd("run", "--context", str(ctx_file), "--query", "q", "--model", ROOT, "--base-url",
                   root_server.url, "--api-key", "k", "--sandbox", "local", "--json",
                   "--price", f"{ROOT}=1.1,3.3")
    assert proc.returncode == 0, proc.stderr
    costs = _costs(json.loads(proc.stdout))
    assert any(c > 0 for c in costs)
    assert all(round(c, 6) == c for c in costs), costs


@pytest.mark.parametrize("where", ["file", "missing"])
def test_cache_info_of_a_file_or_a_missing_directory_is_a_usage_error(tmp_path: Path, where: str) -> None:
    target = tmp_path / where
    if where == "file":
        target.write_text("x")
    needle = "is a file, not a cache directory" if where == "file" else "cache directory not found"
    assert_usage_error(rlm_cmd("cache", "info", str(target)), needle)


def test_batch_on_an_empty_tasks_file_is_a_usage_error(tmp_path: Path) -> None:
    empty = tmp_path / "tasks.jsonl"
    empty.write_text("\n")
    proc = rlm_cmd("batch", str(empty), "--out", str(tmp_path / "o.jsonl"), "--api-key", "k")
    assert_usage_error(proc, "holds no tasks")


def test_batch_dir_that_does_not_exist_says_directory_not_found(tmp_path: Path) -> None:
    proc = rlm_cmd("batch", "--dir", str(tmp_path / "missing"), "--query", "q", "--out",
                   str(tmp_path / "o.jsonl"), "--api-key", "k")
    assert_usage_error(proc, "directory not found")


def test_batch_dir_with_an_empty_file_fails_that_task_unless_allowed(tmp_path: Path,
                                                                      root_server: FakeLLMServer) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "empty.txt").write_text(" \n")
    (docs / "full.txt").write_text("a\nb\n")
    out = tmp_path / "o.jsonl"
    common = ("batch", "--dir", str(docs), "--query", "how many lines?", "--out", str(out), "--model",
              ROOT, "--base-url", root_server.url, "--api-key", "k", "--sandbox", "local", "-q")
    first = rlm_cmd(*common)
    assert first.returncode == 1, first.stderr
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert records["full.txt"]["answer"] == "2 lines"
    assert records["empty.txt"]["answer"] is None
    assert "is empty" in records["empty.txt"]["error"] and "--allow-empty" in records["empty.txt"]["error"]
    again = rlm_cmd(*common, "--allow-empty", "--retry-failed")
    assert again.returncode == 0, again.stderr
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert records["empty.txt"]["answer"] == "1 lines"


@pytest.mark.parametrize("command", ["run", "serve"])
def test_a_cost_budget_over_an_unpriced_model_is_refused_in_flag_words(ctx_file: Path,
                                                                        command: str) -> None:
    extra = ("--context", str(ctx_file), "--query", "q") if command == "run" else ("--port", "0")
    proc = rlm_cmd(command, *extra, "--api-key", "k", "--model", "mystery-model", "--max-cost-usd", "1")
    assert_usage_error(proc, "--max-cost-usd", "--price mystery-model=IN,OUT")
    assert "RLM(" not in proc.stderr and "max_cost_usd" not in proc.stderr


def test_an_unusable_cache_directory_names_the_flag(ctx_file: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    proc = rlm_cmd("run", "--context", str(ctx_file), "--query", "q", "--api-key", "k",
                   "--cache", str(blocker / "cache"))
    assert_usage_error(proc, f"--cache {blocker / 'cache'}")
    assert "cache=False" not in proc.stderr


def test_every_subcommand_has_a_description_in_its_help() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        assert sub.description, f"rlm {name} --help has no description"


def test_dir_of_the_package_shows_only_public_names() -> None:
    import rlm

    names = dir(rlm)
    assert "RLM" in names and "__version__" in names
    assert not {"Any", "TYPE_CHECKING", "importlib", "annotations"} & set(names)


def test_the_package_metadata_names_its_authors_and_urls() -> None:
    from importlib import metadata

    meta = metadata.metadata("rlm-sandbox")
    assert meta.get_all("Author") or meta.get_all("Author-email")
    urls = meta.get_all("Project-URL") or []
    assert any("arxiv.org" in url for url in urls), urls


def test_make_notebooks_passes_allow_root_only_to_root() -> None:
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run(["make", "-n", "-W", "pyproject.toml", "notebooks"], cwd=repo,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lab = next(line for line in proc.stdout.splitlines() if "jupyter lab" in line)
    assert ("--allow-root" in lab) == (os.getuid() == 0)


def test_without_a_terminal_a_batch_prints_one_progress_line_when_done(ctx_file: Path) -> None:
    script = ["```repl\nr = llm_query_batch([f'ECHO {i}' for i in range(100)])\nprint(len(r))\n```",
              "```repl\nFINAL('ok')\n```"]
    with FakeLLMServer(scripts={ROOT: script}) as srv:
        proc = rlm_cmd("run", "--context", str(ctx_file), "--query", "q", "--model", ROOT, "--base-url",
                       srv.url, "--api-key", "k", "--sandbox", "local", "-v")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("sub-queries")]
    assert len(lines) == 1 and lines[0].startswith("sub-queries 100/100"), lines


def test_the_html_page_opens_the_final_iteration(ctx_file: Path, tmp_path: Path) -> None:
    script = ["```repl\nprint(1)\n```"] * 3 + ["```repl\nFINAL('done')\n```"]
    with FakeLLMServer(scripts={ROOT: script}) as srv:
        proc = rlm_cmd("run", "--context", str(ctx_file), "--query", "q", "--model", ROOT, "--base-url",
                       srv.url, "--api-key", "k", "--sandbox", "local", "--log-dir", str(tmp_path / "logs"))
    assert proc.returncode == 0, proc.stderr
    page = tmp_path / "run.html"
    html = rlm_cmd("view", str(next((tmp_path / "logs").glob("*.jsonl"))), "--html", str(page))
    assert html.returncode == 0, html.stderr
    opened = {int(n): bool(flag) for flag, n in
              re.findall(r"<details( open)?[^>]*><summary[^>]*>Iteration (\d+)", page.read_text())}
    assert opened == {1: True, 2: True, 3: False, 4: True}


def test_the_view_of_an_interrupted_run_says_unpriced_for_an_unpriced_model(tmp_path: Path) -> None:
    base = {"run_id": "r", "depth": 0}
    events = [
        {"type": "run_start", "t": 0, **base, "query": "q", "model": "mystery", "recursive_model": "mystery"},
        {"type": "root_reply", "t": 0.5, **base, "iteration": 1, "content": "```repl\nprint(1)\n```",
         "usage": {"prompt_tokens": 100, "completion_tokens": 10, "cost_usd": "unpriced"}},
        {"type": "cell", "t": 0.6, **base, "iteration": 1, "index": 0, "code": "print(1)"},
    ]
    log = tmp_path / "killed.jsonl"
    log.write_text("".join(json.dumps(e) + "\n" for e in events))
    proc = rlm_cmd("view", str(log))
    assert proc.returncode == 0, proc.stderr
    assert "$0.0000" not in proc.stdout
    assert re.search(r"Total cost\s+unpriced", proc.stdout), proc.stdout


def test_run_against_a_stopped_server_says_so_in_one_line(ctx_file: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    sock.close()  # nothing listens there now
    proc = rlm_cmd("run", "--context", str(ctx_file), "--query", "q", "--base-url", url,
                   "--api-key", "k", "--sandbox", "local")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert url in lines[-1] and "is the server running, and is the base URL right?" in lines[-1]
