"""The Ray backend of jobs, on one local Ray cluster (num_cpus=2) for the module."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason="the [ray] extra is part of [dev]")

from rlm import RLM  # noqa: E402
from rlm.cache import SQLiteCache  # noqa: E402
from rlm.testing import FakeLLMServer  # noqa: E402

ROOT = "root-model"
ANSWER_CODE = "```repl\nFINAL(context.split()[0].upper())\n```"


class CountingRoot:
    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, messages: list[dict[str, Any]]) -> str:
        with self._lock:
            self.calls += 1
        return ANSWER_CODE


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    # A short temp dir (Ray's sockets live there) removed afterwards; token auth off for
    # this loopback-only test cluster, so nothing is written to the home directory.
    temp = tempfile.mkdtemp(prefix="rlmray")
    previous = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous
        shutil.rmtree(temp, ignore_errors=True)


# First in the module, before its cluster starts: `--ray-address auto` joins any Ray
# cluster running on the machine, so this runs where no other test has one up (CI runs
# this file on its own).
def test_batch_on_ray_auto_without_a_cluster_ends_in_one_line(tmp_path: Path) -> None:
    tasks_file = tmp_path / "tasks.jsonl"
    tasks_file.write_text('{"id": "a", "query": "q", "context": "c"}\n', encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "RLM_", "RAY_ADDRESS"))}
    proc = subprocess.run(
        [sys.executable, "-m", "rlm.cli", "batch", str(tasks_file), "--out", str(tmp_path / "o.jsonl"),
         "--api-key", "k", "--backend", "ray", "--ray-address", "auto", "-q"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rlm: --ray-address auto:") and "ray start --head" in last


def tasks(n: int) -> list[dict[str, Any]]:
    return [{"id": f"t{i}", "query": "first word?", "context": f"word{i} filler"} for i in range(n)]


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_ray_gives_the_same_ids_and_answers_as_the_local_backend(cluster: None, tmp_path: Path) -> None:
    root = CountingRoot()
    with FakeLLMServer(scripts={ROOT: [root]}, latency=0.01) as srv:
        rlm = RLM(model=ROOT, base_url=srv.url, api_key="k", sandbox="local")
        try:
            local = rlm.run_job(tasks(30), tmp_path / "local.jsonl", concurrency=6, progress=False,
                                sort_output=True)
            remote = rlm.run_job(tasks(30), tmp_path / "ray.jsonl", concurrency=6, progress=False,
                                 sort_output=True, backend="ray", ray_chunk_size=4)
        finally:
            rlm.close()
    assert (local.exit_code, remote.exit_code) == (0, 0)
    pairs = [(r["id"], r["answer"]) for r in lines_of(tmp_path / "ray.jsonl")]
    assert pairs == [(r["id"], r["answer"]) for r in lines_of(tmp_path / "local.jsonl")]
    assert pairs == [(f"t{i}", f"WORD{i}") for i in range(30)]
    assert root.calls == 60  # each task once per backend


def test_a_killed_ray_worker_has_its_tasks_finished_once(cluster: None, tmp_path: Path) -> None:
    root = CountingRoot()
    out = tmp_path / "out.jsonl"
    killed: list[str] = []

    def kill_a_worker() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if out.exists() and out.read_bytes().count(b"\n") >= 4:
                names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                         if a["name"].startswith("rlm-job-") and a["name"].endswith("-worker-0")]
                if names:
                    ray.kill(ray.get_actor(names[0], namespace="rlm"), no_restart=True)
                    killed.append(names[0])
                    return
            time.sleep(0.05)

    with FakeLLMServer(scripts={ROOT: [root]}, latency=0.2) as srv:
        rlm = RLM(model=ROOT, base_url=srv.url, api_key="k", sandbox="local")
        killer = threading.Thread(target=kill_a_worker)
        killer.start()
        try:
            summary = rlm.run_job(tasks(40), out, concurrency=8, progress=False, backend="ray",
                                  ray_chunk_size=4)
        finally:
            killer.join()
            rlm.close()
    assert killed, "no worker was found to kill"
    records = lines_of(out)
    assert sorted(r["id"] for r in records) == sorted(f"t{i}" for i in range(40))  # each once
    assert all(r["answer"] == "WORD" + r["id"][1:] and r["error"] is None for r in records)
    assert summary.exit_code == 0
    assert root.calls >= 40


def test_a_job_budget_holds_across_ray_workers(cluster: None, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with FakeLLMServer(scripts={ROOT: [ANSWER_CODE]}, latency=0.01) as srv:
        rlm = RLM(model=ROOT, base_url=srv.url, api_key="k", sandbox="local")
        try:
            summary = rlm.run_job(tasks(60), out, concurrency=2, progress=False, backend="ray",
                                  ray_chunk_size=4, max_tokens=3000)
        finally:
            rlm.close()
    records = lines_of(out)
    assert summary.exit_code == 1 and summary.stopped and "max_tokens=3000" in summary.stopped
    assert 3 <= len(records) < 20  # ~900 tokens a task; in-flight ones finish, no new ones start
    assert len({r["id"] for r in records}) == len(records)


def test_ray_workers_share_the_cache_directory(cluster: None, tmp_path: Path) -> None:
    # The RLM's store is an object; its directory is what travels to the workers.
    fan_out = "```repl\nprint(llm_query_batch(['ECHO 1 ' + context, 'ECHO 2 ' + context]))\n```"
    with FakeLLMServer(scripts={ROOT: [fan_out, ANSWER_CODE]}, latency=0.01) as srv:
        rlm = RLM(model=ROOT, recursive_model="sub-model", base_url=srv.url, api_key="k",
                  sandbox="local", cache=SQLiteCache(tmp_path / "cache"))
        try:
            first = rlm.run_job(tasks(12), tmp_path / "first.jsonl", concurrency=4, progress=False,
                                backend="ray", ray_chunk_size=4)
            asked = srv.requests
            second = rlm.run_job(tasks(12), tmp_path / "second.jsonl", concurrency=4,
                                 progress=False, backend="ray", ray_chunk_size=4)
            asked_again = srv.requests - asked
        finally:
            rlm.close()
    assert (first.exit_code, second.exit_code) == (0, 0)
    assert (asked, asked_again) == (12 * 4, 0)  # two root turns and two sub-queries a task
    answers = {r["id"]: r["answer"] for r in lines_of(tmp_path / "second.jsonl")}
    assert answers == {r["id"]: r["answer"] for r in lines_of(tmp_path / "first.jsonl")}
    assert answers == {f"t{i}": f"WORD{i}" for i in range(12)}


def test_the_job_deadline_stops_running_tasks_on_ray_workers(cluster: None, tmp_path: Path) -> None:
    # Each task would take 20 turns of ~1 s and never answer; at the job's deadline the
    # tasks running on the workers stop at their next call and their lines come back.
    slow = "```repl\nprint(llm_query_batch(['ECHO a', 'ECHO b']))\n```"
    out = tmp_path / "out.jsonl"
    with FakeLLMServer(scripts={ROOT: [slow]}, latency=0.5) as srv:
        rlm = RLM(model=ROOT, recursive_model="sub-model", base_url=srv.url, api_key="k",
                  sandbox="local")
        try:
            summary = rlm.run_job(tasks(16), out, concurrency=4, progress=False, backend="ray",
                                  ray_chunk_size=2, max_time_s=8)
        finally:
            rlm.close()
    records = lines_of(out)
    assert summary.exit_code == 1 and "job max_time_s=8 reached" in (summary.stopped or "")
    assert 1 <= len(records) <= 4 and summary.not_run == 16 - len(records)
    assert all(r["stopped_reason"] == "budget" for r in records)
    assert all("job max_time_s=8 reached" in r["error"] for r in records)
