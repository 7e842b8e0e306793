"""Batch mode: jobs and plain prompt lists through the providers' Batch APIs.

The fake server speaks OpenAI's Files and Batches with a short turnaround (0.2 s), so a
job's steps each wait on real batches: uploaded, polled, answered out of order. The
root model is scripted (two turns: a cell that fans out one sub-query per context word,
then FINAL of what came back) and the sub model echoes, so every output line can be
checked against its task; the root and sub models differ, as their batch files must.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rlm_support import ROOT, SUB, make_rlm, repl, wait_until

from rlm import RLM
from rlm.batchapi import BatchSettings
from rlm.errors import ConfigError
from rlm.testing import BatchOptions, FakeLLMServer

TURN_1 = repl("parts = llm_query_batch(['ECHO ' + w for w in context.split()[:2]])\nprint(parts)")
TURN_2 = repl("FINAL('-'.join(parts))")
PRICES = {ROOT: (1.0, 4.0), SUB: (0.5, 2.0)}
FAST = BatchSettings(poll_min_s=0.02)
TASKS = 300
STEPS = 3  # root turn 1, the sub-query wave, root turn 2


def tasks(n: int) -> list[dict[str, Any]]:
    return [{"id": f"t{i}", "query": "Join the first two words.", "context": f"a{i} b{i} rest"}
            for i in range(n)]


def right(record: dict[str, Any]) -> bool:
    n = str(record["id"])[1:]
    return record["answer"] == f"a{n}-b{n}"


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def batch_server(**options: Any) -> FakeLLMServer:
    return FakeLLMServer(scripts={ROOT: [TURN_1, TURN_2]},
                         batches=BatchOptions(**{"delay": 0.2, "seed": 7, **options}))


def run_job(srv: FakeLLMServer, out: Path, n: int, closing: list[RLM], **kw: Any) -> Any:
    rlm = make_rlm(srv, closing, prices=PRICES)
    return rlm.run_job(tasks(n), out, progress=False, concurrency=kw.pop("concurrency", 16), **kw)


@pytest.fixture(scope="module")
def batch_job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """300 tasks in batch mode, once for the module: records, summary, server stats."""
    out = tmp_path_factory.mktemp("batch") / "out.jsonl"
    made: list[RLM] = []
    with batch_server() as srv:
        summary = run_job(srv, out, TASKS, made, batch_api=FAST)
        yield {"records": lines_of(out), "summary": summary, "stats": srv.stats(), "out": out}
    for rlm in made:
        rlm.client.close_sync()
        rlm.sub_client.close_sync()


@pytest.fixture(scope="module")
def live_job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The same 300 tasks on the live API."""
    out = tmp_path_factory.mktemp("live") / "out.jsonl"
    made: list[RLM] = []
    with FakeLLMServer(scripts={ROOT: [TURN_1, TURN_2]}) as srv:
        yield run_job(srv, out, TASKS, made)
    for rlm in made:
        rlm.client.close_sync()
        rlm.sub_client.close_sync()


# -- a job in batch mode ----------------------------------------------------------------


def test_batch_mode_answers_every_task_right(batch_job: dict[str, Any]) -> None:
    records = batch_job["records"]
    assert len(records) == TASKS
    assert all(right(r) for r in records), [r for r in records if not right(r)][:3]


def test_batch_mode_sends_no_live_chat_request(batch_job: dict[str, Any]) -> None:
    stats = batch_job["stats"]
    assert stats["requests"] == 0
    assert stats["models"][ROOT]["batch_lines"] == 2 * TASKS
    assert stats["models"][SUB]["batch_lines"] == 2 * TASKS


def test_batch_mode_makes_about_one_batch_per_step(batch_job: dict[str, Any]) -> None:
    # Not one per request (1,200), nor one per task: each step's calls go out together.
    assert STEPS <= batch_job["stats"]["batches_created"] <= STEPS + 2


def test_batch_mode_costs_half_the_live_job(batch_job: dict[str, Any], live_job: Any) -> None:
    summary = batch_job["summary"]
    assert summary.tokens == live_job.tokens
    assert summary.cost_usd == pytest.approx(live_job.cost_usd / 2)


def test_batch_mode_records_count_calls_at_the_batch_price(batch_job: dict[str, Any]) -> None:
    record = batch_job["records"][0]
    root = record["usage"]["root"]
    assert root["calls"] == 2 and root["cached_calls"] == 0
    expected = (root["prompt_tokens"] * 1.0 + root["completion_tokens"] * 4.0) / 1e6 / 2
    assert root["cost_usd"] == pytest.approx(expected, abs=1e-6)


def test_batch_mode_summary_counts_batches_and_lines(batch_job: dict[str, Any]) -> None:
    summary = batch_job["summary"]
    assert summary.batch["lines"] == 4 * TASKS
    assert summary.batch["answered"] == 4 * TASKS
    assert summary.batch["live"] == 0
    assert "Batch API:" in summary.line()


def test_state_file_lists_every_batch_with_its_calls_and_tasks(batch_job: dict[str, Any]) -> None:
    state = Path(str(batch_job["out"]) + ".batch") / "state.jsonl"
    events = [json.loads(line) for line in state.read_text().splitlines()]
    submitting = [e for e in events if e["t"] == "submitting"]
    submitted = {e["token"]: e["batch"] for e in events if e["t"] == "submitted"}
    assert len(submitted) == batch_job["stats"]["batches_created"]
    assert sum(len(e["keys"]) for e in submitting) == 4 * TASKS
    assert {t for e in submitting for t in e["tasks"]} == {f"t{i}" for i in range(TASKS)}
    assert all(e["token"] in submitted for e in submitting)


def test_running_a_finished_batch_job_again_sends_nothing(tmp_path: Path,
                                                          closing: list[RLM]) -> None:
    with batch_server() as srv:
        run_job(srv, tmp_path / "out.jsonl", 3, closing, batch_api=FAST)
        again = run_job(srv, tmp_path / "out.jsonl", 3, closing, batch_api=FAST)
        stats = srv.stats()
    assert again.skipped == 3 and again.done == 0 and again.exit_code == 0
    assert stats["batch_lines"] == 12


# -- retries, expiry and the live fallback -----------------------------------------------


def test_error_file_lines_are_retried_in_a_later_batch(tmp_path: Path, closing: list[RLM]) -> None:
    with batch_server(failure_rate=0.3) as srv:
        summary = run_job(srv, tmp_path / "out.jsonl", 40, closing,
                          batch_api=BatchSettings(poll_min_s=0.02, max_tries=30))
        stats = srv.stats()
    wrong = [r for r in lines_of(tmp_path / "out.jsonl") if not right(r)]
    assert not wrong, [(r["id"], r["answer"]) for r in wrong[:3]]
    assert summary.batch["retried"] > 0
    assert stats["batch_lines"] == 160 + summary.batch["retried"]
    assert stats["requests"] == 0


def test_expired_lines_are_retried_then_sent_live_when_asked(
        tmp_path: Path, closing: list[RLM]) -> None:
    # Each batch expires with three quarters of its lines done (rounded down: a batch of
    # one line never gets one done); what it missed goes again, then live.
    with batch_server(delay=0.4, expire_after=0.3) as srv:
        summary = run_job(srv, tmp_path / "out.jsonl", 40, closing,
                          batch_api=BatchSettings(poll_min_s=0.02, max_tries=3,
                                                  fallback_after_s=3600))
        stats = srv.stats()
    assert all(right(r) for r in lines_of(tmp_path / "out.jsonl"))
    assert summary.batch["retried"] > 0
    assert stats["batch_lines"] == summary.batch["lines"] > 160
    assert stats["requests"] == summary.batch["live"] > 0


def test_calls_past_their_tries_fail_without_a_fallback(tmp_path: Path, closing: list[RLM]) -> None:
    # Every batch expires before any line runs.
    with batch_server(delay=5.0, expire_after=0.05) as srv:
        summary = run_job(srv, tmp_path / "out.jsonl", 5, closing,
                          batch_api=BatchSettings(poll_min_s=0.02, max_tries=2))
        stats = srv.stats()
    records = lines_of(tmp_path / "out.jsonl")
    assert summary.failed == 5 and all(r["answer"] is None for r in records)
    assert "batch submissions" in records[0]["error"]
    assert stats["requests"] == 0


def test_calls_past_their_tries_go_live_with_a_fallback(tmp_path: Path, closing: list[RLM]) -> None:
    with batch_server(delay=5.0, expire_after=0.05) as srv:
        summary = run_job(srv, tmp_path / "out.jsonl", 5, closing,
                          batch_api=BatchSettings(poll_min_s=0.02, max_tries=2,
                                                  fallback_after_s=3600))
        stats = srv.stats()
    assert all(right(r) for r in lines_of(tmp_path / "out.jsonl"))
    assert stats["requests"] == 20  # every call of every step, live
    assert summary.batch["live"] == 20
    assert "20 calls sent live" in summary.line()


def test_a_batch_past_the_fallback_time_is_cancelled_and_finished_live(
        tmp_path: Path, closing: list[RLM]) -> None:
    with batch_server(delay=60.0) as srv:
        summary = run_job(srv, tmp_path / "out.jsonl", 5, closing,
                          batch_api=BatchSettings(poll_min_s=0.02, fallback_after_s=0.3))
        stats = srv.stats()
        statuses = {b["status"] for b in list_batches(srv)}
    assert all(right(r) for r in lines_of(tmp_path / "out.jsonl"))
    assert statuses == {"cancelled"}
    assert stats["requests"] == summary.batch["live"] == 20


def test_a_job_cost_cap_stops_submitting_in_batch_mode(tmp_path: Path, closing: list[RLM]) -> None:
    with batch_server() as srv:
        summary = run_job(srv, tmp_path / "out.jsonl", 40, closing, batch_api=FAST,
                          max_cost_usd=0.001)
        stats = srv.stats()
    assert summary.stopped is not None and "max_cost_usd" in summary.stopped
    assert summary.done < 40
    # Spent calls settle at the batch price, so the job stops near its cap, not at twice it.
    assert summary.batch["lines"] < 160 and stats["requests"] == 0


# -- replays -------------------------------------------------------------------------------


def test_a_cell_drawing_random_numbers_replays_to_the_same_questions(
        tmp_path: Path, closing: list[RLM]) -> None:
    draw = repl("import random\nk = random.randrange(1000)\nparts = [llm_query(f'ECHO {k}')]")
    with FakeLLMServer(scripts={ROOT: [draw, repl("FINAL(parts[0])")]},
                       batches=BatchOptions(delay=0.1)) as srv:
        summary = run_job(srv, tmp_path / "out.jsonl", 10, closing, batch_api=FAST)
        stats = srv.stats()
    records = lines_of(tmp_path / "out.jsonl")
    assert all(r["answer"] is not None and r["answer"].isdigit() for r in records)
    assert summary.batch["live_tasks"] == 0
    assert stats["batch_lines"] == 30  # nothing asked twice


def test_a_task_whose_replays_stop_getting_further_finishes_live(
        tmp_path: Path, closing: list[RLM]) -> None:
    clock = repl("import time\nparts = [llm_query(f'ECHO {time.time()}')]")
    with FakeLLMServer(scripts={ROOT: [clock, repl("FINAL('done')")]},
                       batches=BatchOptions(delay=0.05)) as srv:
        summary = run_job(srv, tmp_path / "out.jsonl", 3, closing,
                          batch_api=BatchSettings(poll_min_s=0.02, max_replays=2))
    assert [r["answer"] for r in lines_of(tmp_path / "out.jsonl")] == ["done"] * 3
    assert summary.batch["live_tasks"] == 3


# -- crash, Ctrl-C and the command line ---------------------------------------------------


def write_tasks(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps(t) + "\n" for t in tasks(n)), encoding="utf-8")
    return path


def batch_cli(srv: FakeLLMServer, tasks_file: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rlm.cli", "batch", str(tasks_file), "--out", str(out),
            "--base-url", srv.url, "--api-key", "k", "--model", ROOT, "--recursive-model", SUB,
            "--sandbox", "local", "--batch-api", "--batch-poll-s", "0.05", "--quiet", *extra]


def list_batches(srv: FakeLLMServer) -> list[dict[str, Any]]:
    request = urllib.request.Request(f"{srv.url}/batches?limit=100",
                                     headers={"Authorization": "Bearer k"})
    with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 - loopback
        return list(json.loads(resp.read())["data"])


def test_rerun_after_kill_finishes_without_paying_twice(tmp_path: Path) -> None:
    n = 60
    tasks_file = write_tasks(tmp_path / "tasks.jsonl", n)
    out = tmp_path / "out.jsonl"
    with batch_server(delay=1.5) as srv:
        first = subprocess.Popen(batch_cli(srv, tasks_file, out), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)
        try:
            # Killed while the sub-query batch is open: root turn 1 was collected.
            assert wait_until(lambda: srv.stats()["batches_created"] >= 2, 60)
        finally:
            first.kill()
            first.wait(30)
        assert not out.exists() or len(lines_of(out)) < n
        again = subprocess.run(batch_cli(srv, tasks_file, out), capture_output=True, text=True,
                               timeout=120)
        stats = srv.stats()
    assert again.returncode == 0, again.stderr
    records = lines_of(out)
    assert len(records) == n and all(right(r) for r in records)
    assert stats["batch_lines"] <= 1.1 * 4 * n
    assert stats["requests"] == 0


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_cancels_open_batches(tmp_path: Path, how: signal.Signals) -> None:
    tasks_file = write_tasks(tmp_path / "tasks.jsonl", 10)
    with batch_server(delay=120.0) as srv:
        proc = subprocess.Popen(batch_cli(srv, tasks_file, tmp_path / "out.jsonl"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            assert wait_until(lambda: srv.stats()["batches_created"] >= 1, 60)
            proc.send_signal(how)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        batches = list_batches(srv)
    assert proc.returncode == (130 if how == signal.SIGINT else 143), err
    assert batches and {b["status"] for b in batches} == {"cancelled"}


def test_batch_flags_need_batch_api(tmp_path: Path, server: FakeLLMServer) -> None:
    tasks_file = write_tasks(tmp_path / "tasks.jsonl", 1)
    argv = batch_cli(server, tasks_file, tmp_path / "out.jsonl")
    argv.remove("--batch-api")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--batch-poll-s needs --batch-api" in done.stderr


def test_batch_api_on_the_ray_backend_is_refused(tmp_path: Path, server: FakeLLMServer,
                                                 closing: list[RLM]) -> None:
    rlm = make_rlm(server, closing)
    with pytest.raises(ConfigError, match="local backend"):
        rlm.run_job(tasks(1), tmp_path / "out.jsonl", batch_api=True, backend="ray")


def test_progress_line_shows_batch_status(tmp_path: Path, closing: list[RLM],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with batch_server(delay=1.5) as srv:
        rlm = make_rlm(srv, closing)
        rlm.run_job(tasks(3), tmp_path / "out.jsonl", batch_api=FAST, progress=True)
    err = capsys.readouterr().err
    assert "tasks waiting 3" in err and "calls pending" in err


# -- the client's own Batch API --------------------------------------------------------------


async def test_submit_batch_returns_replies_in_request_order() -> None:
    from rlm import AsyncOpenAIClient

    async with FakeLLMServer(batches=BatchOptions(delay=0.1, seed=3)) as srv:
        async with AsyncOpenAIClient(model=SUB, api_key="k", base_url=srv.url) as client:
            handle = await client.submit_batch([f"ECHO {i}" for i in range(50)], settings=FAST)
            assert len(handle.ids) == 1
            replies = await handle.results()
        assert srv.stats()["requests"] == 0
    assert replies == [str(i) for i in range(50)]


async def test_batch_results_count_at_half_price_in_client_usage() -> None:
    from rlm import AsyncOpenAIClient

    async with FakeLLMServer(batches=BatchOptions(delay=0.05)) as srv:
        async with AsyncOpenAIClient(model=SUB, api_key="k", base_url=srv.url,
                                     prices={SUB: (1.0, 1.0)}) as client:
            await (await client.submit_batch(["ECHO a", "ECHO b"], settings=FAST)).results()
            batch = client.usage
            await client.completion_batch(["ECHO c", "ECHO d"])
            live = client.usage - batch
    assert batch.calls == 2
    assert batch.cost_usd == pytest.approx(live.cost_usd / 2)


async def test_completion_batch_with_batch_api_answers_from_the_cache_next_time(
        tmp_path: Path) -> None:
    from rlm import AsyncOpenAIClient

    async with FakeLLMServer(batches=BatchOptions(delay=0.05)) as srv:
        async with AsyncOpenAIClient(model=SUB, api_key="k", base_url=srv.url,
                                     cache=tmp_path / "cache") as client:
            first = await client.completion_batch(["ECHO x", "ECHO y"], batch_api=True)
            again = await client.completion_batch(["ECHO x", "ECHO y"], batch_api=True)
        stats = srv.stats()
    assert first == again == ["x", "y"]
    assert stats["batch_lines"] == 2 and stats["requests"] == 0


def test_batch_api_guide_examples_run_as_written(tmp_path: Path) -> None:
    guide = Path(__file__).resolve().parent.parent / "docs" / "guides" / "batch-api.md"
    blocks = re.findall(r"```python\n(.*?)```\n", guide.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 2
    for block in blocks:
        done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
