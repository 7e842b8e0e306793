"""The `rlm` command through a subprocess: run, demo, view, and its exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

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
    assert "run failed (error)" in proc.stderr and "connection failed" in proc.stderr


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
