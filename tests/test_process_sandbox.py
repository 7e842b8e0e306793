"""The worker-process sandbox: attacks a model might write, and the REPL behaviour around them.

In the spirit of CodeJail's suite, each attack asserts three things: the host is
unaffected (no canary file, no secret in any output, the host keeps serving), the error
tells the model what happened, and the next cell works. Everything runs real worker
processes; sub-queries go to a FakeLLMServer over loopback. The OS layer on its own
(the policy bypassed) is covered in tests/sandbox/test_process_os_layer.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rlm_support import pid_alive

from rlm import AsyncOpenAIClient
from rlm.errors import ConfigError, EnvClosedError, SandboxError
from rlm.repl import REPLEnv
from rlm.sandbox import zygote_client
from rlm.testing import FakeLLMServer

CANARY_KEY = "sk-canary-process-sandbox-7f3a9c"

MakeEnv = Callable[..., REPLEnv]


@pytest.fixture
def make_env() -> Iterator[MakeEnv]:
    envs: list[REPLEnv] = []

    def make(context: Any = None, **kwargs: Any) -> REPLEnv:
        kwargs.setdefault("timeout", 2.0)
        env = REPLEnv(context, sandbox="process", **kwargs)
        envs.append(env)
        return env

    yield make
    for env in envs:
        env.close()


@pytest.fixture
def env(make_env: MakeEnv) -> REPLEnv:
    return make_env("the quick brown fox")


def _works(env: REPLEnv) -> None:
    """The REPL still runs code and still has its context."""
    r = env.execute("print(6 * 7, len(context))")
    assert r.error is None, r.error
    assert r.stdout.startswith("42 ")


def _worker_pid(env: REPLEnv) -> int:
    pid = env.executor._res.pid  # type: ignore[attr-defined]
    assert isinstance(pid, int)
    return pid


# -- time -------------------------------------------------------------------------------


def test_infinite_loop_stops_at_the_deadline_and_keeps_variables(env: REPLEnv) -> None:
    env.execute("kept = 'still here'")
    r = env.execute("while True:\n    pass")
    assert r.error is not None and "TimeoutError" in r.error and "2 s" in r.error
    assert env.get("kept") == "still here"
    _works(env)


def test_a_single_long_c_call_is_killed_and_the_repl_restarts(env: REPLEnv) -> None:
    env.execute("lost = 1")
    pid = _worker_pid(env)
    r = env.execute("x = 10**10**8")
    assert r.error is not None
    assert "time limit" in r.error and "killed" in r.error
    assert "restarted" in r.error and "variables" in r.error
    assert not pid_alive(pid)
    with pytest.raises(KeyError):
        env.get("lost")
    _works(env)


def test_a_catastrophic_regex_is_killed(env: REPLEnv) -> None:
    r = env.execute("import re\nre.match('(a+)+$', 'a' * 40 + 'b')")
    assert r.error is not None and "killed" in r.error
    _works(env)


def test_a_thread_cannot_be_started_to_outlive_the_cell(env: REPLEnv) -> None:
    for code in (
        "import threading",
        "import _thread",
        "import concurrent.futures",
    ):
        r = env.execute(code)
        assert r.error is not None and ("not allowed" in r.error or "off limits" in r.error), code
    for code in ("import asyncio\nasyncio.to_thread", "import asyncio\nasyncio.get_running_loop"):
        r = env.execute(code)
        assert r.error is not None and "has no attribute" in r.error, code
    _works(env)


def test_signal_handler_games_are_out_of_reach(env: REPLEnv) -> None:
    for code in (
        "import signal",
        "import faulthandler",
        "import time\ntime.alarm",
        "import os\nos.kill",
    ):
        r = env.execute(code)
        assert r.error is not None, code
    _works(env)


def test_sleep_past_the_deadline_is_stopped(env: REPLEnv) -> None:
    r = env.execute("import time\ntime.sleep(60)")
    assert r.error is not None and "TimeoutError" in r.error
    _works(env)


def test_cpu_limit_kills_a_cell_that_burns_cpu(make_env: MakeEnv) -> None:
    env = make_env("ctx", timeout=30.0, cpu_limit_s=1)
    assert env.protections["rlimit_cpu"] is True
    r = env.execute("10**10**9")
    assert r.error is not None and "CPU-time limit" in r.error and "restarted" in r.error
    _works(env)


# -- memory -----------------------------------------------------------------------------


def test_a_huge_string_is_a_memory_limit_error(env: REPLEnv) -> None:
    env.execute("kept = [1, 2, 3]")
    r = env.execute("y = 'a' * 10**10")
    assert r.error is not None and "MemoryError" in r.error
    assert "2048 MB" in r.error and "memory_limit_mb" in r.error
    assert env.get("kept") == [1, 2, 3]
    _works(env)


def _host_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_memory_bomb_hits_the_limit_not_the_host(make_env: MakeEnv) -> None:
    env = make_env("ctx", memory_limit_mb=512, timeout=20.0)
    peak = _host_peak_mb()
    r = env.execute(
        "def grow():\n    data = []\n    while True:\n        data.append(' ' * 10**7)\ngrow()\n"
    )
    assert r.error is not None and "MemoryError" in r.error and "512 MB" in r.error
    assert _host_peak_mb() - peak < 64  # the worker's memory, not the host's
    _works(env)


def test_doubling_a_list_forever_hits_the_limit(make_env: MakeEnv) -> None:
    env = make_env("ctx", memory_limit_mb=512, timeout=20.0)
    r = env.execute("x = [0]\nwhile True:\n    x = x + x")
    assert r.error is not None and "MemoryError" in r.error
    _works(env)


def test_deep_recursion_is_a_clear_error(env: REPLEnv) -> None:
    r = env.execute("def f(n):\n    return f(n + 1)\nf(0)")
    assert r.error is not None and "RecursionError" in r.error
    assert "Previous line repeated" in r.error
    _works(env)


# -- processes, files, environment, network ---------------------------------------------


def test_every_route_to_fork_is_refused(env: REPLEnv) -> None:
    attempts = [
        "import os\nos.fork()",
        "import subprocess",
        "import multiprocessing",
        "import pty",
        "import posix",
        "__import__('os')",
        "import importlib",
        "().__class__.__base__.__subclasses__()",
        "[c for c in object.__subclasses__() if c.__name__ == 'Popen']",
        "getattr(getattr(len, '__self__'), '__import__')('os')",
        "import collections\ncollections._sys",
        "import json\njson.decoder.sys",
        "import random\nrandom._os",
        "exec('import os')",
        "eval('1')",
    ]
    for code in attempts:
        r = env.execute(code)
        assert r.error is not None, code
    _works(env)


def test_writing_a_file_is_impossible(env: REPLEnv, tmp_path: Path) -> None:
    canary = tmp_path / "canary.txt"
    attempts = [
        f"open({str(canary)!r}, 'w').write('x')",
        "import io\nio.open",
        "import io\nio.FileIO",
        "import pathlib",
        "import shutil",
        "import tempfile",
        "import codecs",
        f"import csv\ncsv.writer(open({str(canary)!r}, 'w'))",
        "x = 'a' * 10**6\nwith open('big.bin', 'w') as f:\n    f.write(x * 10**4)",
    ]
    for code in attempts:
        r = env.execute(code)
        assert r.error is not None, code
    assert not canary.exists()
    _works(env)


def test_reading_etc_passwd_fails(env: REPLEnv) -> None:
    for code in (
        "open('/etc/passwd').read()",
        "import pathlib\npathlib.Path('/etc/passwd').read_text()",
        "import linecache\nlinecache.getline('/etc/passwd', 1)",
    ):
        r = env.execute(code)
        assert r.error is not None
        assert "root:" not in r.stdout + r.stderr + r.error
    _works(env)


def test_the_host_environment_and_api_key_are_invisible(
    make_env: MakeEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", CANARY_KEY)
    # A template process started while the secret is in the host's environment.
    zygote_client.shutdown_zygote()
    env = make_env("ctx")
    outputs = []
    for code in (
        "import os\nos.environ",
        "import os\nos.getenv('OPENAI_API_KEY')",
        "llm_query.__globals__",
        "getattr(llm_query, '__closure__')",
        "print(dir(llm_query))",
        "import time\nprint(dir(time))",
        "print(globals())",
        "print(vars())",
    ):
        r = env.execute(code)
        outputs.append(r.stdout + r.stderr + (r.error or ""))
    assert all(CANARY_KEY not in text for text in outputs)
    pid = _worker_pid(env)
    assert Path(f"/proc/{pid}/environ").read_bytes() == b""
    assert env.protections["empty_environment"] is True
    _works(env)


def test_network_connect_is_refused(env: REPLEnv) -> None:
    with FakeLLMServer() as srv:
        for code in (
            f"import socket\nsocket.create_connection(('127.0.0.1', {srv.port}))",
            f"import urllib.request\nurllib.request.urlopen('{srv.url}')",
            "import http.client",
            "import ssl",
        ):
            r = env.execute(code)
            assert r.error is not None, code
        assert srv.requests == 0
    _works(env)


# -- output -----------------------------------------------------------------------------


def test_an_output_flood_is_capped(make_env: MakeEnv) -> None:
    env = make_env("ctx", timeout=1.0, max_output_chars=2000)
    r = env.execute("while True:\n    print('x' * 10000)")
    assert r.truncated is True
    assert len(r.stdout) < 2200
    assert "characters truncated" in r.stdout
    assert r.error is not None and "TimeoutError" in r.error
    _works(env)


def test_one_giant_print_is_capped(make_env: MakeEnv) -> None:
    env = make_env("ctx", max_output_chars=1000)
    peak = _host_peak_mb()
    r = env.execute("print('y' * 10**8)")
    assert _host_peak_mb() - peak < 64  # 100 MB printed in the worker, 1000 chars here
    assert r.error is None
    assert r.truncated is True and len(r.stdout) < 1200
    _works(env)


def test_a_killed_cell_still_shows_what_it_printed(env: REPLEnv) -> None:
    r = env.execute("print('started the big power')\n10**10**8")
    assert "started the big power" in r.stdout
    assert r.error is not None and "killed" in r.error


# -- the REPL around the worker ---------------------------------------------------------


def test_variables_persist_across_cells(env: REPLEnv) -> None:
    env.execute("counts = {}\nfor w in context.split():\n    counts[w] = len(w)")
    r = env.execute("sorted(counts.items())[:2]")
    assert r.stdout.strip() == "[('brown', 5), ('fox', 3)]"
    assert env.get("counts")["quick"] == 5


def test_context_is_loaded_once_per_worker(make_env: MakeEnv) -> None:
    env = make_env(["alpha", "beta"])
    # An in-place change persists: the worker keeps its own copy, not re-sent per cell.
    assert env.execute("context.append('marker')").error is None
    assert env.execute("print(context)").stdout.strip() == "['alpha', 'beta', 'marker']"
    env.execute("10**10**8")
    # A fresh worker gets the context from the host again, without the marker.
    assert env.execute("print(context)").stdout.strip() == "['alpha', 'beta']"


def test_contexts_of_every_kind_arrive_intact(make_env: MakeEnv) -> None:
    text = "naïve café — 東京 \U0001f600 " * 1000
    cases: list[tuple[Any, str, str]] = [
        (text, "len(context)", str(len(text))),
        ("x" * (20 << 20), "len(context)", str(20 << 20)),
        ({"a": [1, 2.5, None, True], "b": {"c": "d"}}, "context['b']['c']", "'d'"),
        ([{"id": i} for i in range(1000)], "sum(d['id'] for d in context)", "499500"),
        (b"\x00\xffbytes", "context", "b'\\x00\\xffbytes'"),
        (None, "context", ""),
    ]
    for context, code, shown in cases:
        r = make_env(context).execute(code)
        assert r.error is None, r.error
        assert r.stdout.strip() == shown


def test_a_context_too_big_for_the_memory_limit_says_what_to_change() -> None:
    with pytest.raises(SandboxError, match="raise memory_limit_mb"):
        REPLEnv("x" * (200 << 20), sandbox="process", memory_limit_mb=256)


def test_a_memory_limit_below_the_workers_own_size_fails_at_once_saying_what_to_give() -> None:
    # The worker's interpreter and preloaded libraries take more address space than
    # 64 MB: it could not start, and must say so rather than stall until start_timeout.
    with pytest.raises(SandboxError, match=r"memory_limit_mb=64 is below what the worker itself "
                                           r"takes \(\d+ MB.*raise memory_limit_mb to at least \d+"):
        REPLEnv("x", sandbox="process", memory_limit_mb=64, start_timeout=300)


def test_a_context_that_is_not_json_like_is_refused(make_env: MakeEnv) -> None:
    with pytest.raises(ConfigError, match="JSON"):
        make_env({"when": object()})


def test_setup_code_runs_again_after_a_restart(make_env: MakeEnv) -> None:
    env = make_env("ctx", setup_code="def shout(s):\n    return s.upper() + '!'\nprint('setup')")
    assert env.execute("shout(context)").stdout.strip() == "'CTX!'"
    r = env.execute("10**10**8")
    assert "setup code are loaded again" in (r.error or "")
    assert env.execute("shout('again')").stdout.strip() == "'AGAIN!'"


def test_failing_setup_code_refuses_to_create_the_env() -> None:
    with pytest.raises(ConfigError, match="setup_code failed"):
        REPLEnv("ctx", sandbox="process", setup_code="1 / 0")


def test_tools_run_in_the_host_with_json_values(make_env: MakeEnv) -> None:
    seen: list[Any] = []

    def record(item: Any, *, tag: str = "") -> dict[str, Any]:
        seen.append((item, tag, threading.current_thread().name))
        return {"stored": len(seen)}

    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    env = make_env("ctx", tools={"record": record, "double": double})
    r = env.execute("print(record([1, (2, 3)], tag='t'), await double(21))")
    assert r.error is None, r.error
    assert r.stdout.strip() == "{'stored': 1} 42"
    assert seen[0][:2] == ([1, [2, 3]], "t")  # crossed as JSON: the tuple is a list
    r = env.execute("record(object())")
    assert r.error is not None and "JSON-like" in r.error


def test_a_tool_error_reaches_the_cell_as_its_own_type(make_env: MakeEnv) -> None:
    def picky(x: int) -> int:
        raise ValueError(f"no {x}")

    env = make_env("ctx", tools={"picky": picky})
    r = env.execute("try:\n    picky(3)\nexcept ValueError as e:\n    print('caught', e)")
    assert r.stdout.strip() == "caught no 3"


def test_get_returns_a_json_copy_and_refuses_other_values(env: REPLEnv) -> None:
    env.execute("data = {'k': (1, 2)}\nclass C:\n    pass\nobj = C()")
    assert env.get("data") == {"k": [1, 2]}
    with pytest.raises(KeyError):
        env.get("missing")
    with pytest.raises(KeyError):
        env.get("_rlm_state_")
    with pytest.raises(Exception, match="JSON"):
        env.get("obj")


def test_final_and_final_var(env: REPLEnv) -> None:
    assert env.execute("FINAL('done')").final == "done"
    assert env.execute("answer = 42\nFINAL_VAR('answer')").final == 42
    assert env.execute("FINAL({'ids': ['a', 'b'], 'n': 2.5})").final == {"ids": ["a", "b"], "n": 2.5}
    assert env.execute("1").final is None


def test_a_closed_env_refuses_work_and_removes_its_directory(make_env: MakeEnv) -> None:
    env = make_env("ctx")
    pid = _worker_pid(env)
    root = Path(f"/proc/{pid}/root")
    assert root.is_dir()
    env.close()
    env.close()
    assert not root.exists()
    assert not pid_alive(pid)
    with pytest.raises(EnvClosedError):
        env.execute("1")


def test_protections_are_reported(env: REPLEnv) -> None:
    prot = env.protections
    assert prot["wall_timeout_kill"] is True
    assert prot["empty_environment"] is True
    assert prot["private_cwd"] is True
    for key in ("ipc_namespace", "filesystem_jail", "uid_drop", "rlimit_as", "rlimit_nproc"):
        assert isinstance(prot[key], bool)
    assert prot["network_namespace"] in ("own", "shared", False)
    if os.geteuid() == 0 and not prot["uid_drop"]:
        assert "RLIMIT_NPROC" in str(prot["notes"])


def test_the_local_sandbox_reports_no_os_protections() -> None:
    with REPLEnv("ctx", sandbox="local") as env:
        prot = env.protections
    assert not any(v for k, v in prot.items() if k not in ("notes", "kill_scope", "subquery_caps"))
    assert prot["kill_scope"] == "none"
    assert prot["subquery_caps"] == "max_batch_items=100000, max_prompt_bytes=4194304, max_in_flight=1024"
    assert "sandbox='process'" in str(prot["notes"])


def test_many_envs_run_at_once_without_sharing(make_env: MakeEnv) -> None:
    envs = [make_env(f"ctx-{i}") for i in range(8)]
    results: dict[int, str] = {}

    def work(i: int) -> None:
        env = envs[i]
        env.execute(f"mine = {i}")
        results[i] = env.execute("print(context, mine)").stdout.strip()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: f"ctx-{i} {i}" for i in range(8)}
    pids = {_worker_pid(e) for e in envs}
    assert len(pids) == 8


async def test_aexecute_from_the_callers_own_loop(env: REPLEnv) -> None:
    r = await env.aexecute("async def f():\n    return 7\nawait f()")
    assert r.stdout.strip() == "7"


async def test_a_cancelled_aexecute_kills_the_cell(env: REPLEnv) -> None:
    pid = _worker_pid(env)
    task = asyncio.ensure_future(env.aexecute("10**10**8"))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not pid_alive(pid)
    r = await env.aexecute("print(len(context))")
    assert r.stdout.strip() == "19"


# -- sub-queries ------------------------------------------------------------------------


@pytest.fixture
def slow_server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(latency=0.3) as srv:
        yield srv


def _client(srv: FakeLLMServer) -> AsyncOpenAIClient:
    return AsyncOpenAIClient(
        model="fake-model", api_key="x", base_url=srv.url, max_concurrency=1000
    )


def test_llm_query_batch_of_200_runs_concurrently_from_a_worker(
    make_env: MakeEnv, slow_server: FakeLLMServer
) -> None:
    client = _client(slow_server)
    try:
        env = make_env("ctx", client=client, timeout=60.0)
        r = env.execute("out = llm_query_batch([f'ECHO {i}' for i in range(200)])\nprint(out[:3])")
        assert r.error is None, r.error
        assert r.stdout.strip() == "['0', '1', '2']"
        assert r.sub_calls == 200
        assert slow_server.peak_in_flight == 200
        assert env.get("out") == [str(i) for i in range(200)]
    finally:
        client.close_sync()


def test_prompts_of_every_kind_reach_the_model_intact_from_a_worker(
    make_env: MakeEnv, server: FakeLLMServer
) -> None:
    # Prompt text crosses from the worker as raw UTF-8 beside the frame's JSON: large,
    # non-ASCII and lone-surrogate text, and chat-message prompts, must all arrive as sent.
    client = _client(server)
    try:
        env = make_env("ctx", client=client, timeout=30.0)
        r = env.execute(
            "big = 'line of text \\\\ with \"quotes\"\\n' * 20000\n"
            "odd = 'caf\\u00e9 \\u6f22\\u5b57 \\U0001f642 end'\n"
            "lone = 'x' * 70 + '\\ud800'\n"
            "chat = [{'role': 'user', 'content': 'ECHO ' + odd}]\n"
            "batch = llm_query_batch(['ECHO ' + big, 'ECHO ' + odd, chat, lone, 'ECHO tail'])\n"
            "one = llm_query('ECHO ' + big)\n"
            "two = await llm_query_async(chat)\n"
            "ok = [batch[:3] + batch[4:] == [big, odd, odd, 'tail'], one == big, two == odd]\n"
            "empty = [llm_query(''), llm_query_batch(['', '']), llm_query_batch(['', 'ECHO e'])]\n"
            "print(ok, len(big))"
        )
        assert r.error is None, r.error
        assert r.stdout.strip() == "[True, True, True] 580000"
        assert r.sub_calls == 12
        blank = "fake answer to: "  # what the fake model says to an empty prompt
        assert env.get("empty") == [blank, [blank, blank], [blank, "e"]]
        # The fake model cannot echo a lone surrogate, but it must have been asked one.
        prompts = [entry["messages"][-1]["content"] for entry in server.requests_log]
        assert "x" * 70 + "\ud800" in prompts
    finally:
        client.close_sync()


def test_llm_query_and_its_async_forms(make_env: MakeEnv, server: FakeLLMServer) -> None:
    client = _client(server)
    try:
        env = make_env("ctx", client=client)
        r = env.execute(
            "a = llm_query('ECHO one')\n"
            "b = await llm_query_async('ECHO two')\n"
            "c = await llm_query_batch_async(['ECHO 3', 'ECHO 4'])\n"
            "print(a, b, c)"
        )
        assert r.error is None, r.error
        assert r.stdout.strip() == "one two ['3', '4']"
        assert r.sub_calls == 4
        r = env.execute("llm_query(123)")
        assert r.error is not None and "prompt must be a str" in r.error
        r = env.execute("llm_query('ECHO x', api_key='steal')")
        assert r.error is not None and "unsupported parameter" in r.error
    finally:
        client.close_sync()


def test_failed_sub_queries_are_reported_like_in_process(
    make_env: MakeEnv, server: FakeLLMServer
) -> None:
    client = AsyncOpenAIClient(model="fake-model", api_key="x", base_url=server.url, max_retries=0)
    try:
        env = make_env("ctx", client=client)
        server.inject("500", 100)
        r = env.execute("res = llm_query_batch(['ECHO 1', 'ECHO 2'])\nprint(res[0][:17])")
        assert r.stdout.strip() == "[llm_query error:"
        assert "2 of 2 sub-queries failed" in r.stderr
        r = env.execute(
            "try:\n    llm_query('ECHO 1')\nexcept LLMQueryError as e:\n    print('caught', e)"
        )
        assert r.stdout.startswith("caught ") and "500" in r.stdout
        r = env.execute("llm_query('ECHO 1')")
        assert r.error is not None and "LLMQueryError" in r.error
    finally:
        client.close_sync()


def test_without_a_client_llm_query_says_how_to_get_one(env: REPLEnv) -> None:
    r = env.execute("llm_query('hi')")
    assert r.error is not None and "client=AsyncOpenAIClient" in r.error


def test_a_timed_out_cell_drops_its_sub_queries(
    make_env: MakeEnv, slow_server: FakeLLMServer
) -> None:
    client = _client(slow_server)
    try:
        slow_server.latency = 5.0
        env = make_env("ctx", client=client, timeout=0.5)
        r = env.execute("llm_query('ECHO slow')")
        assert r.error is not None and "TimeoutError" in r.error
        slow_server.latency = 0.0
        assert env.execute("print(llm_query('ECHO fast'))").stdout.strip() == "fast"
    finally:
        client.close_sync()


def test_interpreter_exit_leaves_no_processes_directories_or_warnings(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import json, sys
        from rlm import REPLEnv
        from rlm.sandbox import zygote_client
        kept = [REPLEnv("ctx", sandbox="process", timeout=1) for _ in range(3)]
        kept[0].execute("x = 1")
        kept[1].execute("10**10**8")  # killed and restarted in the background
        closed = REPLEnv("ctx", sandbox="process")
        closed.close()
        pids = [e.executor._res.pid for e in kept] + [zygote_client.get_zygote().proc.pid]
        # Each worker's root is a tmpfs in its own mount namespace (nothing on disk) or a
        # directory per worker start, removed when that worker is reaped.
        roots = [f"/proc/{pid}/root/" for pid in pids[:-1]]
        print(json.dumps({"pids": pids, "roots": roots}))
        # exits without closing the three envs
        """
    )
    proc = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(isinstance(pid, int) and (not pid_alive(pid)) for pid in seen["pids"])
    assert not any(Path(root).exists() for root in seen["roots"])
