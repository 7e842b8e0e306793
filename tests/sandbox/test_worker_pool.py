"""Warm process-sandbox workers: a REPL borrowed from a WorkerPool sees nothing of the
REPL the same worker served before (no variable, no file, no module facade state, no
pending task), and a worker that cannot prove it is clean is killed, never lent.

"Same worker" is shown with the executor's test-only raw hook: a marker put in the
worker's interpreter by the first REPL (outside the policy) is still there for the
second, so the second really ran in the first one's process.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rlm_support import pid_alive, wait_until

from rlm import RLM
from rlm.sandbox.process import ProcessExecutor
from rlm.sandbox.worker_pool import WorkerPool
from rlm.testing import FakeLLMServer

MARK = "import rlm.sandbox.worker as w\nresult = getattr(w, 'pool_test_mark', None)\n"


@pytest.fixture
def pool() -> Iterator[WorkerPool]:
    p = WorkerPool()
    yield p
    p.close()


def _executor(pool: WorkerPool, context: object = "ctx", **kw: object) -> ProcessExecutor:
    ex = ProcessExecutor(context=context, worker_pool=pool, _allow_raw=True, **kw)
    ex.start()
    return ex


def _wait_idle(pool: WorkerPool, n: int = 1) -> dict[str, int]:
    """Closing hands the worker back asynchronously (it resets first): wait for it."""
    wait_until(lambda: pool.stats()["idle"] >= n, 10)
    return pool.stats()


def _wait_settled(pool: WorkerPool, returned: int, refused: int) -> dict[str, int]:
    """Wait until ``returned`` workers came back (kept or retired) and ``refused`` failed."""

    def settled() -> bool:
        s = pool.stats()
        return s["returned"] + s["retired"] >= returned and s["refused"] >= refused

    wait_until(settled, 10)
    return pool.stats()


def _park_one(pool: WorkerPool) -> int:
    """Start a REPL on ``pool``, close it and wait until its worker idles there; its pid."""
    ex = _executor(pool)
    pid = ex._res.pid
    assert pid is not None
    ex.close()
    assert _wait_idle(pool)["idle"] == 1
    return pid


def _names(ex: ProcessExecutor) -> list[str]:
    out = ex.execute("print(sorted(k for k in dir() if not k.startswith('_')))", 10)
    assert out.error is None, out.error
    return out.stdout


def test_a_reused_worker_carries_no_variable_file_or_facade_state(pool: WorkerPool) -> None:
    fresh = ProcessExecutor(context="fresh")
    try:
        baseline = _names(fresh)
        fresh_random = fresh.execute("import random\nrandom.seed(7)\nprint(random.random())", 10).stdout
        file_access = bool(fresh.protections["file_access"])
    finally:
        fresh.close()

    a = _executor(pool, context="context of A")
    a_protections = a.protections
    assert a_protections["wall_timeout_kill"] is True
    assert a._run_raw("import rlm.sandbox.worker as w\nw.pool_test_mark = 'A'\nresult = 1").value == 1
    cell = (
        "secret = 'A-secret-4242'\n"
        "def helper():\n    return secret\n"
        "class Kept:\n    pass\n"
        "import csv, random, asyncio, decimal\n"
        "csv.field_size_limit(5)\n"
        "decimal.getcontext().prec = 3\n"
        "decimal.getcontext().traps[decimal.Inexact] = True\n"
        "random.seed(7)\n"
        "seeded = random.random()\n"
        "async def forever():\n    await asyncio.sleep(3600)\n"
        "async def main():\n    asyncio.create_task(forever())\n    await asyncio.sleep(0)\n"
        "asyncio.run(main())\n"
    )
    if file_access:
        cell += "with open('a-secret.txt', 'w') as f:\n    f.write('A-secret-4242')\nkept_file = open('held.txt', 'w')\n"
    out = a.execute(cell, 10)
    assert out.error is None, out.error
    a.close()
    stats = _wait_idle(pool)
    assert stats["idle"] == 1 and stats["refused"] == 0, stats

    b = _executor(pool, context="context of B")
    try:
        assert pool.stats()["reused"] == 1
        assert b._run_raw(MARK).value == "A"  # the very same worker process
        assert b.protections == a_protections  # every OS protection still reported
        assert _names(b) == baseline
        out = b.execute(
            "import csv, random, decimal\n"
            "print(csv.field_size_limit())\n"
            "print(context)\n"
            "random.seed(7)\n"
            "print(random.random())\n"
            "print(decimal.Decimal(1) / decimal.Decimal(7))\n",
            10,
        )
        assert out.error is None, out.error
        limit, context, rnd, seventh = out.stdout.splitlines()
        assert limit == "131072" and context == "context of B"
        assert seventh == "0.1428571428571428571428571429"  # default precision, no trap
        assert rnd + "\n" == fresh_random  # a per-REPL generator, as in a fresh worker
        assert "A-secret" not in out.stdout
        gone = b.execute("print(secret)", 10)
        assert gone.error is not None and "NameError" in gone.error
        if file_access:
            listing = b._run_raw("import os\nresult = sorted(os.listdir('.'))").value
            assert listing == []
            missing = b.execute("open('a-secret.txt').read()", 10)
            assert missing.error is not None and "FileNotFoundError" in missing.error
        else:
            refused = b.execute("open('a-secret.txt')", 10)
            assert refused.error is not None
    finally:
        b.close()


def test_files_left_in_any_shape_are_cleared_before_reuse(pool: WorkerPool) -> None:
    a = _executor(pool)
    planted = a._run_raw(
        "import os\n"
        "os.makedirs('d1/d2/d3', exist_ok=True)\n"
        "open('d1/d2/d3/deep.txt', 'w').write('x' * 1000)\n"
        "os.symlink('/etc/passwd', 'link-out')\n"
        "os.symlink('d1', 'link-dir')\n"
        "os.mkfifo('fifo')\n"
        "os.chmod('d1/d2', 0)\n"
        "os.chmod('d1', 0o500)\n"
        "result = sorted(os.listdir('.'))\n"
    )
    assert planted.value == ["d1", "fifo", "link-dir", "link-out"], planted
    a._run_raw("import rlm.sandbox.worker as w\nw.pool_test_mark = 'planted'\nresult = 1")
    a.close()
    assert _wait_idle(pool)["idle"] == 1
    b = _executor(pool)
    try:
        assert b._run_raw(MARK).value == "planted"
        assert b._run_raw("import os\nresult = os.listdir('.')").value == []
    finally:
        b.close()


def test_a_worker_that_cannot_show_it_is_clean_is_killed_not_lent(pool: WorkerPool) -> None:
    # A tree deeper than the reset walks, a thread and an open descriptor: three ways
    # to fail the check; each worker is killed and the next REPL gets a fresh one.
    payloads = [
        "import os\nfor i in range(40):\n    os.mkdir('d')\n    os.chdir('d')\nos.chdir('/')\nresult = 1",
        "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()\nresult = 1",
        "import os\nglobal_fd = os.open('.', os.O_RDONLY)\nimport rlm.sandbox.worker as w\nw.kept = global_fd\nresult = 1",
    ]
    for n, payload in enumerate(payloads, start=1):
        a = _executor(pool)
        pid = a._res.pid
        assert pid is not None
        assert a._run_raw(payload).value == 1
        a.close()
        stats = _wait_settled(pool, returned=0, refused=n)
        assert stats["refused"] == n and stats["idle"] == 0, (payload, stats)
        assert wait_until(lambda pid=pid: not pid_alive(pid), 5)
    b = _executor(pool)
    try:
        assert b._run_raw(MARK).value is None  # a fresh process
        assert b.execute("print(1 + 1)", 10).stdout == "2\n"
    finally:
        b.close()


def test_a_worker_that_handed_out_a_data_library_is_not_lent_again(pool: WorkerPool) -> None:
    a = _executor(pool)
    data = str(a.protections["data_modules"])
    out = a.execute("import numpy\nprint(numpy.zeros(2).sum())", 10)
    a.close()
    if "numpy" in data:
        assert out.error is None and out.stdout == "0.0\n"
        stats = _wait_settled(pool, returned=0, refused=1)
        assert stats["refused"] == 1 and stats["idle"] == 0
    else:
        # Without the OS layer the library is refused, and the worker stays lendable.
        assert out.error is not None and "numpy" in out.error
        assert _wait_idle(pool)["idle"] == 1


def test_a_killed_worker_is_not_returned_and_limits_must_match(pool: WorkerPool) -> None:
    a = _executor(pool)
    # A loop is stopped by the policy (that worker lives on and is lent again); one long
    # C call outlives its deadline and the worker is killed: it never reaches the pool.
    out = a.execute("x = 10 ** 10 ** 8", 0.2)
    assert out.error is not None and "killed" in out.error
    a.close()
    time.sleep(0.3)
    assert pool.stats()["idle"] == 0
    b = _executor(pool, memory_limit_mb=512)
    b.close()
    _wait_idle(pool)
    # Different limits: the idle 512 MB worker is not lent to a 2048 MB REPL.
    c = _executor(pool)
    try:
        stats = pool.stats()
        assert stats["reused"] == 0 and stats["idle"] == 1
        assert c.execute("print(3)", 10).stdout == "3\n"
    finally:
        c.close()


def test_a_worker_serves_at_most_max_uses_repls() -> None:
    with WorkerPool(max_uses=2) as pool:
        marks = []
        for i in range(3):
            ex = _executor(pool)
            marks.append(ex._run_raw(MARK).value)
            ex._run_raw(f"import rlm.sandbox.worker as w\nw.pool_test_mark = {i}\nresult = 1")
            ex.close()
            _wait_settled(pool, returned=i + 1, refused=0)
        assert marks == [None, 0, None]  # the third REPL got a new process
        assert pool.stats()["retired"] == 1


def test_closing_the_pool_kills_its_idle_workers() -> None:
    pool = WorkerPool()
    pid = _park_one(pool)
    assert pid_alive(pid)
    pool.close()
    assert wait_until(lambda: not pid_alive(pid), 5)
    # Given back after close: killed on arrival.
    ex2 = ProcessExecutor(context="x", worker_pool=pool)
    ex2.start()
    ex2.close()
    stats = _wait_settled(pool, returned=2, refused=0)
    assert stats["idle"] == 0 and stats["retired"] == 1


def test_rlm_runs_share_warm_workers_and_reuse_workers_false_does_not(tmp_path: Path) -> None:
    script = ["```repl\nnote = context.upper()\nFINAL(note)\n```"] * 3
    with FakeLLMServer(scripts={"root": script * 2}) as srv:
        with RLM(model="root", base_url=srv.url, api_key="k", sandbox="process") as rlm:
            assert rlm.worker_pool is not None
            answers = []
            for ctx in ("one", "two", "three"):
                answers.append(rlm.completion(context=ctx, query="q").answer)
                _wait_idle(rlm.worker_pool)
            assert answers == ["ONE", "TWO", "THREE"]
            stats = rlm.worker_pool.stats()
            assert stats["started"] == 1 and stats["reused"] == 2
        with RLM(model="root", base_url=srv.url, api_key="k", sandbox="process",
                 reuse_workers=False) as rlm:
            assert rlm.worker_pool is None
            assert rlm.completion(context="four", query="q").answer == "FOUR"


def test_idle_workers_expire_and_a_dropped_pool_kills_its_own() -> None:
    pool = WorkerPool(idle_s=0.3)
    pid = _park_one(pool)
    wait_until(lambda: not pid_alive(pid) and not pool.stats()["idle"], 5)
    assert pool.stats()["idle"] == 0 and not pid_alive(pid)

    dropped = WorkerPool()
    pid = _park_one(dropped)
    del dropped  # never closed
    gc.collect()
    assert wait_until(lambda: not pid_alive(pid), 5)


def test_a_cpu_limit_of_one_repl_does_not_follow_its_worker_to_the_next(pool: WorkerPool) -> None:
    a = _executor(pool, cpu_limit_s=1)
    assert a.execute("x = 1", 10).error is None
    a.close()
    assert _wait_idle(pool)["idle"] == 1
    b = _executor(pool)  # no cpu_limit_s
    try:
        assert pool.stats()["reused"] == 1
        soft = b._run_raw("import resource\nresult = resource.getrlimit(resource.RLIMIT_CPU)[0]").value
        assert soft == -1  # RLIM_INFINITY: nothing left from A's per-cell limit
        # and a cell that runs longer than A's one second of CPU is not killed
        out = b.execute("n = 0\nfor i in range(30_000_000):\n    n += i\nprint(n > 0)", 60)
        assert out.error is None and out.stdout == "True\n", out.error
    finally:
        b.close()
