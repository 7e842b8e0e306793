"""`rlm batch` and RLM.run_job: inputs, resumable output, job caps, exit codes.

The root model is scripted on FakeLLMServer to answer with the first word of the
context in upper case, so every line of the output can be checked against its task,
and the script counts root requests, which proves which tasks really ran.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rlm import RLM
from rlm.errors import TaskInputError
from rlm.testing import FakeLLMServer

ROOT = "root-model"
ANSWER_CODE = "```repl\nFINAL(context.split()[0].upper())\n```"


class CountingRoot:
    """A root-model script item that answers with ANSWER_CODE and counts requests."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, messages: list[dict[str, Any]]) -> str:
        with self._lock:
            self.calls += 1
        return ANSWER_CODE


@pytest.fixture
def root() -> CountingRoot:
    return CountingRoot()


@pytest.fixture
def srv(root: CountingRoot) -> Iterator[FakeLLMServer]:
    with FakeLLMServer(scripts={ROOT: [root]}, latency=0.005) as server:
        yield server


def write_tasks(path: Path, n: int, *, start: int = 0) -> list[dict[str, Any]]:
    tasks = [
        {"id": f"t{i}", "query": "What is the first word?", "context": f"word{i} " + "filler " * 20}
        for i in range(start, start + n)
    ]
    path.write_text("".join(json.dumps(t) + "\n" for t in tasks), encoding="utf-8")
    return tasks


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def expected(task_id: str) -> str:
    return "WORD" + task_id[1:]


def rlm_cli(srv: FakeLLMServer, *args: str, **kw: Any) -> list[str]:
    return [sys.executable, "-m", "rlm.cli", "batch", *args, "--base-url", srv.url, "--api-key", "k",
            "--model", ROOT, "--sandbox", "local"]


def run_cli(srv: FakeLLMServer, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(rlm_cli(srv, *args), capture_output=True, text=True, timeout=timeout)


def make_rlm(srv: FakeLLMServer, **kw: Any) -> RLM:
    kw.setdefault("sandbox", "local")
    return RLM(model=ROOT, base_url=srv.url, api_key="k", **kw)


# -- resume ------------------------------------------------------------------------------


def test_a_killed_job_resumes_without_rerunning_finished_tasks(
    tmp_path: Path, srv: FakeLLMServer, root: CountingRoot
) -> None:
    tasks_file, out = tmp_path / "tasks.jsonl", tmp_path / "out.jsonl"
    write_tasks(tasks_file, 300)
    srv.latency = 0.05  # the job takes seconds, so the kill lands part-way
    proc = subprocess.Popen(
        rlm_cli(srv, str(tasks_file), "--out", str(out), "--concurrency", "4"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 40:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_before = out.read_bytes().count(b"\n")  # complete lines; a torn one is dropped
    assert 40 <= finished_before < 300
    srv.latency = 0.0
    calls_before = root.calls

    result = run_cli(srv, str(tasks_file), "--out", str(out), "--concurrency", "8")

    assert result.returncode == 0, result.stderr
    records = lines_of(out)
    assert len(records) == 300
    assert sorted(r["id"] for r in records) == sorted(f"t{i}" for i in range(300))
    assert all(r["answer"] == expected(r["id"]) for r in records)
    assert root.calls - calls_before == 300 - finished_before  # one root turn per task left
    assert f"{finished_before} already done" in result.stderr


def test_a_torn_last_line_is_dropped_and_its_task_run_again(
    tmp_path: Path, srv: FakeLLMServer, root: CountingRoot
) -> None:
    tasks_file, out = tmp_path / "tasks.jsonl", tmp_path / "out.jsonl"
    write_tasks(tasks_file, 6)
    rlm = make_rlm(srv)
    try:
        rlm.run_job(str(tasks_file), out, progress=False, sort_output=True)
        good = out.read_bytes().splitlines(keepends=True)
        # A crash mid-write: five whole lines and half of the sixth.
        out.write_bytes(b"".join(good[:5]) + good[5][: len(good[5]) // 2])
        calls = root.calls
        summary = rlm.run_job(str(tasks_file), out, progress=False)
    finally:
        rlm.close()
    records = lines_of(out)
    assert [r["id"] for r in records] == [f"t{i}" for i in range(6)]
    assert records[5]["answer"] == "WORD5"
    assert root.calls - calls == 1
    assert (summary.skipped, summary.done) == (5, 1)


def test_a_corrupt_line_before_the_last_refuses_to_resume(tmp_path: Path, srv: FakeLLMServer) -> None:
    tasks_file, out = tmp_path / "tasks.jsonl", tmp_path / "out.jsonl"
    write_tasks(tasks_file, 2)
    out.write_text('{"id": "t0", "answer": "WORD0"}\nnot json\n{"id": "t1", "answer": "WORD1"}\n')
    result = run_cli(srv, str(tasks_file), "--out", str(out))
    assert result.returncode == 2
    assert "line 2" in result.stderr and "not a JSON record" in result.stderr


def test_retry_failed_runs_again_only_the_tasks_that_failed(
    tmp_path: Path, srv: FakeLLMServer, root: CountingRoot
) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"d{i}.txt").write_text(f"word{i} text")
    tasks_file, out = tmp_path / "tasks.jsonl", tmp_path / "out.jsonl"
    lines = [{"id": f"t{i}", "query": "first word?", "context_path": f"docs/d{i}.txt"} for i in range(4)]
    lines.append({"id": "t4", "query": "first word?", "context_path": "docs/missing.txt"})
    tasks_file.write_text("".join(json.dumps(x) + "\n" for x in lines))

    rlm = make_rlm(srv)
    try:
        first = rlm.run_job(str(tasks_file), out, progress=False)
        assert (first.done, first.failed, first.exit_code) == (4, 1, 1)
        failed = [r for r in lines_of(out) if r["error"]]
        assert [r["id"] for r in failed] == ["t4"] and "not found" in failed[0]["error"]

        (docs / "missing.txt").write_text("word4 now here")
        again = rlm.run_job(str(tasks_file), out, progress=False)
        assert (again.skipped_failed, again.exit_code) == (1, 1)  # the failure stands
        calls = root.calls
        retried = rlm.run_job(str(tasks_file), out, progress=False, retry_failed=True)
    finally:
        rlm.close()
    assert (retried.done, retried.exit_code) == (1, 0)
    records = lines_of(out)
    assert sorted(r["id"] for r in records) == [f"t{i}" for i in range(5)]
    assert all(r["answer"] == expected(r["id"]) and r["error"] is None for r in records)
    assert root.calls - calls == 1


def test_duplicate_ids_are_a_usage_error(tmp_path: Path, srv: FakeLLMServer) -> None:
    tasks_file = tmp_path / "tasks.jsonl"
    tasks_file.write_text(
        json.dumps({"id": "a", "query": "q", "context": "x"}) + "\n"
        + json.dumps({"id": "b", "query": "q", "context": "y"}) + "\n"
        + json.dumps({"id": "a", "query": "q", "context": "z"}) + "\n"
    )
    result = run_cli(srv, str(tasks_file), "--out", str(tmp_path / "out.jsonl"))
    assert result.returncode == 2
    assert "duplicate task id 'a'" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_duplicate_ids_from_python_raise_a_typed_error(tmp_path: Path, srv: FakeLLMServer) -> None:
    rlm = make_rlm(srv)
    try:
        with pytest.raises(TaskInputError, match="duplicate task id 1"):
            rlm.run_job([{"id": 1, "query": "q"}, {"id": 1, "query": "q"}], tmp_path / "o.jsonl")
    finally:
        rlm.close()


# -- inputs ------------------------------------------------------------------------------


def test_dir_input_runs_one_task_per_file_with_relative_paths_as_ids(
    tmp_path: Path, srv: FakeLLMServer
) -> None:
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("alpha one")
    (docs / "sub" / "b.txt").write_text("beta two")
    (docs / ".hidden").write_text("gamma")
    out = tmp_path / "out.jsonl"
    result = run_cli(srv, "--dir", str(docs), "--query", "first word?", "--out", str(out), "--sorted")
    assert result.returncode == 0, result.stderr
    assert [(r["id"], r["answer"]) for r in lines_of(out)] == [("a.txt", "ALPHA"), ("sub/b.txt", "BETA")]


def test_csv_input_with_named_columns(tmp_path: Path, srv: FakeLLMServer) -> None:
    (tmp_path / "big.txt").write_text("delta from a file")
    csv_file = tmp_path / "tasks.csv"
    csv_file.write_text(
        "id,query,context,context_path\n"
        'c1,first word?,"gamma, with a comma",\n'
        "c2,first word?,,big.txt\n"
    )
    out = tmp_path / "out.jsonl"
    rlm = make_rlm(srv)
    try:
        summary = rlm.run_job(str(csv_file), out, sort_output=True, progress=False)
    finally:
        rlm.close()
    assert summary.exit_code == 0
    assert [(r["id"], r["answer"]) for r in lines_of(out)] == [("c1", "GAMMA,"), ("c2", "DELTA")]


def test_sorted_rewrites_the_output_in_input_order(tmp_path: Path) -> None:
    # Earlier tasks answer later, so completion order is the reverse of input order.
    def slow_first(messages: list[dict[str, Any]]) -> str:
        text = json.dumps(messages)
        n = int(text.split("word", 1)[1].split(" ", 1)[0]) if "word" in text else 0
        time.sleep(0.02 * (5 - n))
        return ANSWER_CODE

    with FakeLLMServer(scripts={ROOT: [slow_first]}) as server:
        tasks_file = tmp_path / "tasks.jsonl"
        write_tasks(tasks_file, 6)
        out, unsorted = tmp_path / "out.jsonl", tmp_path / "unsorted.jsonl"
        rlm = make_rlm(server)
        try:
            rlm.run_job(str(tasks_file), unsorted, concurrency=6, progress=False)
            rlm.run_job(str(tasks_file), out, concurrency=6, progress=False, sort_output=True)
        finally:
            rlm.close()
    assert [r["id"] for r in lines_of(unsorted)] != [f"t{i}" for i in range(6)]  # completion order
    assert [r["id"] for r in lines_of(out)] == [f"t{i}" for i in range(6)]


# -- job caps and exit codes -------------------------------------------------------------


def test_a_job_token_cap_stops_the_running_task_and_retry_failed_finishes_the_job(
    tmp_path: Path, srv: FakeLLMServer
) -> None:
    tasks_file, out = tmp_path / "tasks.jsonl", tmp_path / "out.jsonl"
    write_tasks(tasks_file, 20)
    rlm = make_rlm(srv)
    try:
        capped = rlm.run_job(str(tasks_file), out, concurrency=1, max_tokens=1500, progress=False)
        done = lines_of(out)
        rest = rlm.run_job(str(tasks_file), out, retry_failed=True, progress=False)
    finally:
        rlm.close()
    assert capped.exit_code == 1
    assert capped.stopped is not None and "job max_tokens=1500 reached" in capped.stopped
    assert 2 <= len(done) < 20 and capped.not_run == 20 - len(done)
    # each task uses ~900 tokens: the tasks before the cap finished; the root turn that
    # reached it stopped its task at once, which says whose cap it was
    assert [r["stopped_reason"] for r in done] == ["final"] * (len(done) - 1) + ["budget"]
    assert "job max_tokens=1500 reached" in done[-1]["error"]
    assert sum(r["tokens"] for r in done[:-1]) < 1500 <= sum(r["tokens"] for r in done)
    assert rest.exit_code == 0
    records = lines_of(out)
    assert sorted(r["id"] for r in records) == sorted(f"t{i}" for i in range(20))
    assert all(r["answer"] == expected(r["id"]) for r in records)


SUB = "sub-model"
FAN_OUT_CODE = (
    "```repl\nparts = llm_query_batch(['ECHO ' + context * 3 + str(i) for i in range(16)])\n"
    "print(len(parts))\n```"
)


def test_a_job_token_cap_binds_per_call_across_concurrent_tasks(tmp_path: Path) -> None:
    # 24 tasks at once, each a root turn, a fan-out of 16 sub-queries and a second root
    # turn: ~3,700 tokens a task, ~89,000 for the job, against a job cap of 40,000.
    # Checked only when tasks start, all 24 would start and overshoot by ~49,000.
    # Per call, a call is sent only while the settled tokens plus the reservations in
    # flight are under the cap, and every reservation here covers its call (prompt
    # chars / 4 + 1 plus the largest reply seen, while the fake server counts chars / 4
    # and the sub replies are shorter than the root's). So the job spends at most the
    # cap plus the one reservation admitted last: the longest prompt / 4 + 1 + 256.
    cap = 40_000
    script = [FAN_OUT_CODE, ANSWER_CODE]
    tasks_file, out = tmp_path / "tasks.jsonl", tmp_path / "out.jsonl"
    tasks = write_tasks(tasks_file, 24)
    with FakeLLMServer(lambda messages: "ok", scripts={ROOT: script}, latency=0.02) as srv:
        result = subprocess.run(
            [*rlm_cli(srv, str(tasks_file), "--out", str(out), "--concurrency", "24",
                      "--max-tokens", str(cap), "--recursive-model", SUB, "--quiet")],
            capture_output=True, text=True, timeout=120,
        )
        log = srv.requests_log
        sent = srv.requests
    assert result.returncode == 1, result.stderr
    records = lines_of(out)
    assert len(records) == len(tasks)  # every task ran: each was cut short or finished
    spent = sum(r["tokens"] for r in records)
    longest_prompt = max(sum(len(m["content"]) for m in entry["messages"]) for entry in log)
    bound = cap + longest_prompt // 4 + 1 + 256
    print(f"\n[job cap] 24 tasks at once: {sent} requests, {spent:,} tokens for a cap of "
          f"{cap:,} (bound {bound:,})")
    assert cap <= spent <= bound
    # what the server was asked for is what the lines say was spent: nothing unaccounted
    assert sent == len(log) == sum(r["usage"]["root"]["calls"] + r["usage"]["sub"]["calls"]
                                   for r in records)
    cut = [r for r in records if r["stopped_reason"] != "final"]
    assert cut and {r["stopped_reason"] for r in cut} == {"budget"}
    assert all(f"job max_tokens={cap}" in r["error"] for r in cut)
    assert all(r["answer"] == expected(r["id"]) for r in records if r not in cut)


SLOW_CODE = "```repl\nprint(llm_query_batch(['ECHO a', 'ECHO b']))\n```"


def test_the_job_deadline_stops_running_tasks_at_their_next_call(tmp_path: Path) -> None:
    # Each task would take 20 turns of ~0.4 s (a root call, then a sub-query batch) and
    # never answer; the job's 1.5 s deadline binds the running runs themselves.
    out = tmp_path / "out.jsonl"
    tasks = [{"id": f"t{i}", "query": "q", "context": f"word{i}"} for i in range(8)]
    with FakeLLMServer(scripts={ROOT: [SLOW_CODE]}, latency=0.2) as srv:
        rlm = make_rlm(srv, recursive_model=SUB)
        try:
            summary = rlm.run_job(tasks, out, concurrency=3, max_time_s=1.5, progress=False)
        finally:
            rlm.close()
    records = lines_of(out)
    assert summary.exit_code == 1 and "job max_time_s=1.5 reached" in (summary.stopped or "")
    assert (len(records), summary.not_run) == (3, 5)  # the three running tasks, no new ones
    assert all(r["stopped_reason"] == "budget" for r in records)
    assert all("job max_time_s=1.5 reached" in r["error"] for r in records)


def test_sigterm_stops_the_job_with_exit_143_and_a_valid_output(
    tmp_path: Path, srv: FakeLLMServer
) -> None:
    tasks_file, out = tmp_path / "tasks.jsonl", tmp_path / "out.jsonl"
    write_tasks(tasks_file, 200)
    srv.latency = 0.1
    proc = subprocess.Popen(rlm_cli(srv, str(tasks_file), "--out", str(out), "--concurrency", "2"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (out.exists() and out.read_bytes().count(b"\n") >= 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    records = lines_of(out)  # every line whole and parseable
    assert 3 <= len(records) < 200
    assert [r for r in records if r["answer"] != expected(r["id"])] == []
    assert "terminated" in stderr


def test_the_python_form_returns_a_summary(tmp_path: Path, srv: FakeLLMServer) -> None:
    tasks = [{"id": i, "query": "first word?", "context": f"w{i} x"} for i in range(5)]
    rlm = make_rlm(srv)
    try:
        summary = rlm.run_job(tasks, tmp_path / "out.jsonl", concurrency=3, progress=False,
                              sort_output=True)
    finally:
        rlm.close()
    assert (summary.total, summary.done, summary.failed, summary.exit_code) == (5, 5, 0, 0)
    assert [(r["id"], r["answer"]) for r in lines_of(tmp_path / "out.jsonl")] == [
        (i, f"W{i}") for i in range(5)
    ]
    assert summary.tokens == sum(r["tokens"] for r in lines_of(tmp_path / "out.jsonl"))


def test_a_job_of_many_runs_at_once_holds_full_collections_back_only_while_it_runs(
    tmp_path: Path,
) -> None:
    import gc

    seen: list[int] = []

    def root_turn(messages: list[dict[str, Any]]) -> str:
        seen.append(gc.get_threshold()[2])  # the server thread shares this process's collector
        return ANSWER_CODE

    tasks = [{"id": i, "query": "first word?", "context": f"w{i} x"} for i in range(40)]
    before = gc.get_threshold()
    with FakeLLMServer(scripts={ROOT: [root_turn]}) as server:
        rlm = make_rlm(server)
        try:
            wide = rlm.run_job(tasks, tmp_path / "wide.jsonl", concurrency=20, progress=False)
            assert gc.get_threshold() == before
            during_wide, seen[:] = set(seen), []
            narrow = rlm.run_job(tasks, tmp_path / "narrow.jsonl", concurrency=2, progress=False)
        finally:
            rlm.close()
    assert (wide.done, narrow.done) == (40, 40)
    assert during_wide == {max(before[2], 100)}
    assert set(seen) == {before[2]}  # a narrow job leaves the collector alone
    assert gc.get_threshold() == before


def test_log_dir_keeps_one_trajectory_per_task(tmp_path: Path, srv: FakeLLMServer) -> None:
    tasks_file, out, logs = tmp_path / "tasks.jsonl", tmp_path / "out.jsonl", tmp_path / "logs"
    write_tasks(tasks_file, 3)
    rlm = make_rlm(srv, log_dir=logs)
    try:
        rlm.run_job(str(tasks_file), out, progress=False)
    finally:
        rlm.close()
    paths = [Path(r["log_path"]) for r in lines_of(out)]
    assert len(set(paths)) == 3 and all(p.parent == logs and p.exists() for p in paths)


def test_tasks_file_and_dir_together_are_a_usage_error(tmp_path: Path, srv: FakeLLMServer) -> None:
    result = run_cli(srv, str(tmp_path / "t.jsonl"), "--dir", str(tmp_path), "--out", "o.jsonl")
    assert result.returncode == 2
    assert "not both" in result.stderr


def test_environment_is_not_needed_for_the_api_key(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    (tmp_path / "t.jsonl").write_text(json.dumps({"id": 1, "query": "q"}) + "\n")
    result = subprocess.run([sys.executable, "-m", "rlm.cli", "batch", str(tmp_path / "t.jsonl"),
                             "--out", str(tmp_path / "o.jsonl")], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 2
    assert "no API key" in result.stderr


# -- memory ------------------------------------------------------------------------------

MEMORY_CHILD = """
import json, sys
from pathlib import Path
from rlm import RLM
from rlm.testing import FakeLLMServer

tasks_file, out = sys.argv[1], sys.argv[2]
def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
def rss():
    return status("VmRSS")
with FakeLLMServer(scripts={"root": ["```repl\\nFINAL(str(len(context)))\\n```"]}) as srv:
    rlm = RLM(model="root", base_url=srv.url, api_key="k", sandbox="local")
    rlm.completion(context="warm-up", query="q")
    base = rss()
    summary = rlm.run_job(tasks_file, out, concurrency=2, progress=False)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child spawned by a
    # big parent (a long pytest session) would report the parent's peak as its own.
    peak = status("VmHWM")
    rlm.close()
print(json.dumps({"base": base, "peak": peak, "done": summary.done}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_memory_stays_flat_because_contexts_load_when_their_task_starts(tmp_path: Path) -> None:
    # 80 tasks of 2 MB (160 MB of contexts), 2 at a time: file paths and inline JSONL lines.
    text = ("y" * 99 + "\n") * 20_000
    doc = tmp_path / "doc.txt"
    doc.write_text(text)
    tasks_file = tmp_path / "tasks.jsonl"
    with tasks_file.open("w") as fh:
        for i in range(80):
            item: dict[str, Any] = {"id": i, "query": "how long?"}
            if i % 4 == 0:
                item["context"] = text
            else:
                item["context_path"] = str(doc)
            fh.write(json.dumps(item) + "\n")
    child = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(tasks_file), str(tmp_path / "o.jsonl")],
                           capture_output=True, text=True, timeout=180)
    assert child.returncode == 0, child.stderr
    numbers = json.loads(child.stdout.strip().splitlines()[-1])
    assert numbers["done"] == 80
    assert all(r["answer"] == str(len(text)) for r in lines_of(tmp_path / "o.jsonl"))
    # Holding every context would add 160 MB. Two at a time, their transient bytes, the
    # allocator's per-thread arenas and at most 32 MB of contexts awaiting collection
    # stay well below, and do not grow with the number of tasks.
    assert numbers["peak"] - numbers["base"] < 64, numbers


def test_a_schema_gives_each_line_a_validated_output(tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"first": {"type": "string"}},
                                  "required": ["first"]}))
    tasks_file, out = tmp_path / "tasks.jsonl", tmp_path / "out.jsonl"
    write_tasks(tasks_file, 3)
    typed = "```repl\nFINAL({'first': context.split()[0]})\n```"
    with FakeLLMServer(scripts={ROOT: [typed]}) as server:
        result = run_cli(server, str(tasks_file), "--out", str(out), "--schema", str(schema),
                         "--sorted")
    assert result.returncode == 0, result.stderr
    assert [r["output"] for r in lines_of(out)] == [{"first": f"word{i}"} for i in range(3)]


# -- cache -------------------------------------------------------------------------------


def test_batch_cache_answers_a_second_job_without_asking_the_server_again(tmp_path: Path) -> None:
    tasks_file, cache = tmp_path / "tasks.jsonl", tmp_path / "cache"
    write_tasks(tasks_file, 6)
    # sub-queries go to the echo responder: each reply is its own prompt
    with FakeLLMServer(scripts={ROOT: [FAN_OUT_CODE, ANSWER_CODE]}, latency=0.005) as srv:
        first = run_cli(srv, str(tasks_file), "--out", str(tmp_path / "first.jsonl"),
                        "--recursive-model", SUB, "--concurrency", "3", "--cache", str(cache))
        asked = srv.requests
        second = run_cli(srv, str(tasks_file), "--out", str(tmp_path / "second.jsonl"),
                         "--recursive-model", SUB, "--concurrency", "3", "--cache", str(cache))
        asked_again = srv.requests - asked
    assert (first.returncode, second.returncode) == (0, 0), (first.stderr, second.stderr)
    assert asked == 6 * (2 + 16)  # two root turns and 16 sub-queries a task
    assert asked_again == 0
    answers = {r["id"]: r["answer"] for r in lines_of(tmp_path / "first.jsonl")}
    again = lines_of(tmp_path / "second.jsonl")
    assert answers == {r["id"]: r["answer"] for r in again} == {f"t{i}": f"WORD{i}" for i in range(6)}
    for record in again:
        assert record["usage"]["root"]["calls"] == record["usage"]["sub"]["calls"] == 0
        assert (record["usage"]["root"]["cached_calls"], record["usage"]["sub"]["cached_calls"]) == (2, 16)
        assert record["tokens"] == 0


def test_batch_cache_before_the_tasks_file_is_a_usage_error(tmp_path: Path, srv: FakeLLMServer) -> None:
    tasks_file = tmp_path / "tasks.jsonl"
    write_tasks(tasks_file, 1)
    result = subprocess.run(
        [sys.executable, "-m", "rlm.cli", "batch", "--cache", str(tasks_file), "--out",
         str(tmp_path / "out.jsonl"), "--api-key", "k", "--base-url", srv.url],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "put the tasks file before --cache" in result.stderr


# -- sandbox workers ---------------------------------------------------------------------


def test_batch_in_the_process_sandbox_with_warm_and_with_fresh_workers(tmp_path: Path) -> None:
    # Each task's first cell looks for the variable every task sets: with warm workers
    # a task's REPL must still start without the one an earlier task left.
    turns = ["```repl\nleaked = 'mine' in dir()\nmine = context\nprint(leaked)\n```",
             "```repl\nFINAL(context.split()[0].upper() + ('-LEAK' if leaked else ''))\n```"]
    tasks_file = tmp_path / "tasks.jsonl"
    write_tasks(tasks_file, 6)
    with FakeLLMServer(scripts={ROOT: turns}) as server:
        for flags, out in (([], "warm.jsonl"), (["--fresh-workers"], "fresh.jsonl")):
            result = run_cli(server, str(tasks_file), "--out", str(tmp_path / out), "--sandbox",
                             "process", "--concurrency", "2", "--sorted", *flags)
            assert result.returncode == 0, result.stderr
            assert [r["answer"] for r in lines_of(tmp_path / out)] == [f"WORD{i}" for i in range(6)]


def test_run_job_and_arun_job_name_every_option_with_the_jobs_defaults() -> None:
    # What an IDE shows for RLM.run_job is its signature: every option by name, with
    # the defaults the job itself applies.
    import inspect

    from rlm.jobs import arun_job as job

    options = {n: p for n, p in inspect.signature(job).parameters.items() if n != "rlm"}
    for method in (RLM.run_job, RLM.arun_job):
        params = {n: p for n, p in inspect.signature(method).parameters.items() if n != "self"}
        assert list(params) == list(options)
        assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in params.values())
        assert {n: p.default for n, p in params.items()} == {
            n: p.default for n, p in options.items()
        }
