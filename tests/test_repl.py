"""REPLEnv behaviour: results, output, isolation, FINAL, limits, sub-queries, lifecycle.

Real envs with real worker threads (the in-process sandbox, named explicitly: the
default is the worker-process one, tested in test_process_sandbox.py); sub-queries go
to FakeLLMServer over loopback (the echo responder answers "ECHO x" with "x"). The
sandbox suites live in tests/sandbox/.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest

from rlm import AsyncOpenAIClient, ExecResult, REPLEnv
from rlm.errors import ConfigError, EnvClosedError
from rlm.repl import default_sandbox, describe_context
from rlm.testing import FakeLLMServer, Fault


@pytest.fixture
def client(server: FakeLLMServer) -> Iterator[AsyncOpenAIClient]:
    c = AsyncOpenAIClient(
        model="fake-model", api_key="k", base_url=server.url, max_concurrency=64, max_retries=1
    )
    yield c
    c.close_sync()


@pytest.fixture
def env(client: AsyncOpenAIClient) -> Iterator[REPLEnv]:
    with REPLEnv(sandbox="local", context="hello world", client=client, timeout=5.0) as e:
        yield e


# -- results and output --------------------------------------------------------------------


def test_exec_result_fields(env: REPLEnv) -> None:
    r = env.execute("print('out')\nx = 41 + 1")
    assert isinstance(r, ExecResult)
    assert (r.stdout, r.stderr, r.error, r.final, r.sub_calls, r.truncated) == (
        "out\n", "", None, None, 0, False,
    )  # fmt: skip
    assert r.duration_s > 0
    assert env.get("x") == 42


def test_repr_is_short_and_readable(env: REPLEnv) -> None:
    r = env.execute("print('x' * 5000)")
    text = repr(r)
    assert text.startswith("ExecResult(") and "stdout=" in text
    assert len(text) < 200


def test_trailing_expression_is_echoed(env: REPLEnv) -> None:
    assert env.execute("a = [1, 2]\na + [3]").stdout == "[1, 2, 3]\n"
    assert env.execute("'text'").stdout == "'text'\n"
    assert env.execute("None").stdout == ""
    assert env.execute("x = 5").stdout == ""


def test_output_cap_keeps_head_and_tail(client: AsyncOpenAIClient) -> None:
    with REPLEnv(sandbox="local", client=client, max_output_chars=200) as env:
        r = env.execute("print('HEAD' + 'x' * 5000 + 'TAIL')")
    assert r.truncated
    assert r.stdout.startswith("HEADxxx")
    assert r.stdout.endswith("xxxTAIL\n")
    assert "[4,809 characters truncated]" in r.stdout
    assert len(r.stdout) < 300


def test_stderr_is_capped_separately(client: AsyncOpenAIClient) -> None:
    with REPLEnv(sandbox="local", client=client, max_output_chars=100) as env:
        r = env.execute("for i in range(50):\n    llm_query = i\nprint('ok')")
    assert r.stdout == "ok\n"
    assert "llm_query is reserved" in r.stderr


def test_error_shows_only_user_lines(env: REPLEnv) -> None:
    env.execute("def inner(d):\n    return d['missing']")
    r = env.execute("import json\nvalue = json.loads('{}')\ninner(value)")
    assert r.error is not None
    assert r.error.splitlines() == [
        "Traceback (most recent call last):",
        '  File "<cell 2>", line 3, in <module>',
        "    inner(value)",
        '  File "<cell 1>", line 2, in inner',
        "    return d['missing']",
        "KeyError: 'missing'",
    ]


def test_error_from_library_code_hides_library_frames(env: REPLEnv) -> None:
    r = env.execute("import json\njson.loads('{bad')")
    assert r.error is not None
    assert "json.decoder.JSONDecodeError" not in r.error
    assert "JSONDecodeError: Expecting property name" in r.error
    assert "site-packages" not in r.error and "/lib/python" not in r.error and "rlm/" not in r.error


def test_syntax_error_has_line_caret_and_hint(env: REPLEnv) -> None:
    r = env.execute("x = 1\nfor i in range(3)\n    pass")
    assert r.error is not None
    assert 'File "<cell 1>", line 2' in r.error
    assert "for i in range(3)" in r.error
    assert "SyntaxError" in r.error and "hint:" in r.error


def test_policy_error_names_the_line_and_hints(env: REPLEnv) -> None:
    r = env.execute("a = 1\nb = a.__class__")
    assert r.error is not None
    assert 'File "<cell 1>", line 2' in r.error
    assert "hint: names and attributes starting with '_'" in r.error


def test_refused_import_lists_allowed_modules(env: REPLEnv) -> None:
    r = env.execute("import os")
    assert r.error is not None
    assert "Allowed modules: asyncio, base64, bisect, collections" in r.error


# -- persistence, reserved names, FINAL ----------------------------------------------------


def test_variables_persist_across_cells(env: REPLEnv) -> None:
    env.execute("def double(x):\n    return 2 * x\nstate = {'n': 1}")
    env.execute("state['n'] += double(10)")
    assert env.execute("print(state)").stdout == "{'n': 21}\n"


def test_reserved_names_are_restored_after_the_cell(env: REPLEnv) -> None:
    r = env.execute("llm_query = None\nFINAL = 3\ncontext = 'replaced'\ndel FINAL_VAR")
    assert r.error is None
    assert r.stderr == (
        "note: FINAL, FINAL_VAR, context, llm_query are reserved in this REPL and were "
        "restored; use another variable name\n"
    )
    after = env.execute("print(context)\nFINAL(llm_query('ECHO back'))")
    assert after.stdout == "hello world\n"
    assert after.final == "back"


def test_final_keeps_plain_data_and_turns_anything_else_into_its_str(env: REPLEnv) -> None:
    assert env.execute("FINAL(42)").final == 42
    assert env.execute("FINAL(['a', 1, ('t', None)])").final == ["a", 1, ["t", None]]
    assert env.execute("FINAL('done')").final == "done"
    assert env.execute("FINAL({'a', 'b'} - {'b'})").final == "{'a'}"  # a set is not JSON
    assert env.execute("FINAL(None)").final == "None"


def test_final_is_per_cell(env: REPLEnv) -> None:
    assert env.execute("FINAL('first')").final == "first"
    assert env.execute("x = 1").final is None


def test_final_var_reads_the_variable(env: REPLEnv) -> None:
    r = env.execute("answer = {'total': 3}\nFINAL_VAR('answer')")
    assert r.final == {"total": 3}
    assert env.execute('FINAL_VAR("answer")').final == {"total": 3}


def test_final_var_of_a_missing_name_is_an_error_in_the_cell(env: REPLEnv) -> None:
    r = env.execute("FINAL_VAR('nope')")
    assert r.final is None
    assert r.error is not None and "no variable named 'nope'" in r.error
    assert env.execute("print('fine')").stdout == "fine\n"


# -- limits --------------------------------------------------------------------------------


def test_timeout_stops_the_cell_and_keeps_the_env(client: AsyncOpenAIClient) -> None:
    with REPLEnv(sandbox="local", client=client, timeout=0.5) as env:
        r = env.execute("before = 1\nwhile True:\n    pass")
        assert r.error is not None
        assert r.error.startswith("TimeoutError: the cell ran longer than its 0.5 s time limit")
        assert "line 2" in r.error
        after = env.execute("print(before + 1)")
    assert after.error is None and after.stdout == "2\n"


def test_timeout_stops_a_cell_waiting_on_a_sub_query(server: FakeLLMServer) -> None:
    server.inject("hang", count=1)
    c = AsyncOpenAIClient(model="fake-model", api_key="k", base_url=server.url, timeout=60)
    try:
        with REPLEnv(sandbox="local", client=c, timeout=0.5) as env:
            r = env.execute("llm_query('ECHO 1')")
            assert r.error is not None and "TimeoutError" in r.error
            assert env.execute("print('next')").stdout == "next\n"
    finally:
        c.close_sync()


def test_cell_stuck_in_c_code_is_abandoned_with_a_clear_error(client: AsyncOpenAIClient) -> None:
    # One key derivation runs in C for seconds (with the GIL released, so the waiting
    # caller can notice): the deadline cannot interrupt it, so after the grace period
    # the env moves on to a fresh worker thread.
    with REPLEnv(sandbox="local", client=client, timeout=0.3, grace_s=0.3) as env:
        env.execute("kept = 'yes'")
        r = env.execute("import hashlib\nhashlib.pbkdf2_hmac('sha256', b'pw', b'salt', 8_000_000)")
        assert r.error is not None
        assert "C-level operation" in r.error and "fresh worker thread" in r.error
        assert "sandbox='process'" in r.error
        after = env.execute("print(kept)")
    assert after.error is None and after.stdout == "yes\n"


def test_recursion_is_bounded(env: REPLEnv) -> None:
    r = env.execute("def down(n):\n    return down(n + 1)\ndown(0)")
    assert r.error is not None and "RecursionError" in r.error
    assert "[Previous line repeated" in r.error
    assert env.execute("print('ok')").stdout == "ok\n"


def test_system_exit_ends_only_the_cell(env: REPLEnv) -> None:
    r = env.execute("raise SystemExit(3)")
    assert r.error is not None and "SystemExit: 3" in r.error
    assert env.execute("print('alive')").stdout == "alive\n"


def test_functions_from_a_cell_are_inert_outside_cells(env: REPLEnv) -> None:
    # Host code calling a function defined in the REPL runs no user code at all, so it
    # cannot loop or run on a host thread after the cell ended.
    env.execute("def spin():\n    while True:\n        pass")
    spin = env.get("spin")
    with pytest.raises(BaseException, match="only run inside a cell"):
        spin()


# -- isolation -----------------------------------------------------------------------------


def test_two_envs_in_two_threads_see_only_their_own_output(
    client: AsyncOpenAIClient, capsys: pytest.CaptureFixture[str]
) -> None:
    results: dict[str, ExecResult] = {}

    def run(name: str) -> None:
        with REPLEnv(sandbox="local", client=client) as env:
            results[name] = env.execute(f"for i in range(1000):\n    print('{name}', i)")

    threads = [threading.Thread(target=run, args=(n,)) for n in ("alpha", "beta")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("the caller's own print")
    for name, other in (("alpha", "beta"), ("beta", "alpha")):
        lines = results[name].stdout.splitlines()
        assert len(lines) == 1000
        assert all(line.startswith(name) for line in lines)
        assert other not in results[name].stdout
    assert capsys.readouterr().out == "the caller's own print\n"


def test_fifty_envs_on_one_client_share_nothing(client: AsyncOpenAIClient) -> None:
    envs = [REPLEnv(sandbox="local", context=f"ctx-{i}", client=client) for i in range(50)]
    results: list[ExecResult | None] = [None] * 50

    def run(i: int) -> None:
        results[i] = envs[i].execute(
            f"mine = {i}\n"
            "answers = llm_query_batch([f'ECHO {mine}-{k}' for k in range(5)])\n"
            "print(context, answers[0], answers[-1])\n"
            "FINAL(context)"
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        for i, r in enumerate(results):
            assert r is not None and r.error is None, r
            assert r.stdout == f"ctx-{i} {i}-0 {i}-4\n"
            assert r.final == f"ctx-{i}"
            assert r.sub_calls == 5
            assert envs[i].get("mine") == i
    finally:
        for e in envs:
            e.close()


# -- sub-queries ---------------------------------------------------------------------------


def test_llm_query_counts_sub_calls(env: REPLEnv) -> None:
    r = env.execute("a = llm_query('ECHO one')\nb = llm_query('ECHO two')\nprint(a, b)")
    assert r.stdout == "one two\n"
    assert r.sub_calls == 2


def test_llm_query_batch_keeps_order_and_counts(env: REPLEnv) -> None:
    r = env.execute("rs = llm_query_batch([f'ECHO {i}' for i in range(20)])\nprint(rs[:3], len(rs))")
    assert r.stdout == "['0', '1', '2'] 20\n"
    assert r.sub_calls == 20


def test_async_forms_with_top_level_await(env: REPLEnv) -> None:
    r = env.execute(
        "one = await llm_query_async('ECHO a')\n"
        "many = await llm_query_batch_async(['ECHO b', 'ECHO c'])\n"
        "print(one, many)"
    )
    assert r.error is None, r.error
    assert r.stdout == "a ['b', 'c']\n"
    assert r.sub_calls == 3


def test_failed_batch_items_become_error_strings(client: AsyncOpenAIClient, server: FakeLLMServer) -> None:
    server.responder = lambda messages: Fault("500") if "FAIL" in messages[-1]["content"] else "ok"
    with REPLEnv(sandbox="local", client=client) as env:
        r = env.execute("rs = llm_query_batch(['a', 'FAIL 1', 'b', 'FAIL 2'])\nprint(rs)")
    assert r.error is None
    assert r.stdout.startswith("['ok', '[llm_query error: ")
    rs = eval(r.stdout)  # noqa: S307 - our own printed list literal
    assert rs[0] == rs[2] == "ok"
    assert rs[1].startswith("[llm_query error: ") and rs[3].startswith("[llm_query error: ")
    assert "2 of 4 sub-queries failed" in r.stderr
    assert r.sub_calls == 4


def test_failed_llm_query_raises_a_catchable_error(client: AsyncOpenAIClient, server: FakeLLMServer) -> None:
    server.responder = lambda messages: Fault("500")
    with REPLEnv(sandbox="local", client=client) as env:
        r = env.execute(
            "try:\n    llm_query('x')\nexcept LLMQueryError as e:\n    print('caught:', type(e).__name__)"
        )
        uncaught = env.execute("llm_query('x')")
    assert r.error is None and r.stdout == "caught: LLMQueryError\n"
    assert uncaught.error is not None and "LLMQueryError: " in uncaught.error


def test_without_a_client_llm_query_is_an_error_in_the_cell() -> None:
    with REPLEnv(sandbox="local", context="c") as env:
        r = env.execute("llm_query('hi')")
        assert r.error is not None and "no model client is configured" in r.error
        assert env.execute("print(context)").stdout == "c\n"


def test_sub_query_params_are_checked(env: REPLEnv) -> None:
    assert env.execute("print(llm_query('ECHO t', temperature=0, max_tokens=5))").stdout == "t\n"
    r = env.execute("llm_query('ECHO t', extra_headers={'x': 'y'})")
    assert r.error is not None and "unsupported parameter 'extra_headers'" in r.error
    r = env.execute("llm_query(123)")
    assert r.error is not None and "a prompt must be a str" in r.error


# -- event loops and threads ---------------------------------------------------------------


async def test_execute_works_inside_a_running_event_loop(env: REPLEnv) -> None:
    # A notebook cell or a web handler: the sync call blocks this thread, nothing breaks.
    asyncio.get_running_loop()
    r = env.execute("x = await llm_query_async('ECHO in-loop')\nprint(llm_query('ECHO sync'), x)")
    assert r.error is None, r.error
    assert r.stdout == "sync in-loop\n"


async def test_aexecute_does_not_block_the_loop() -> None:
    # The cell waits for a task of the caller's loop: were the loop blocked, the task
    # could never run and the wait would give up.
    from_loop = threading.Event()
    with REPLEnv(sandbox="local", tools={"wait_for_the_loop": lambda: from_loop.wait(10)}) as env:

        async def set_it() -> None:
            await asyncio.sleep(0)
            from_loop.set()

        task = asyncio.create_task(set_it())
        r = await env.aexecute("print(wait_for_the_loop())")
        await task
    assert r.stdout == "True\n"


async def test_cancelling_aexecute_stops_the_cell(env: REPLEnv) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(env.aexecute("n = 0\nwhile True:\n    n += 1"), 0.3)
    r = await env.aexecute("print('free again', n > 0)")
    assert r.stdout == "free again True\n"


def test_cells_run_on_the_env_thread_not_the_callers() -> None:
    # `threading` is not importable in a cell, so the env exposes its thread through a tool.
    names: list[str] = []
    with REPLEnv(sandbox="local", tools={"where": lambda: names.append(threading.current_thread().name)}) as e:
        e.execute("where()\nwhere()")
    assert len(names) == 2 and names[0] == names[1]
    assert names[0].startswith("rlm-repl-") and names[0] != threading.current_thread().name


# -- context -------------------------------------------------------------------------------


def test_large_context_is_not_copied(client: AsyncOpenAIClient) -> None:
    ctx = "z" * 100_000_000
    tracemalloc.start()
    try:
        with REPLEnv(sandbox="local", context=ctx, client=client) as env:
            assert env.get("context") is ctx
            r = env.execute("print(len(context), context[:3])")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.stdout == "100000000 zzz\n"
    assert peak < 10_000_000  # far below one more copy of the 100 MB context


def test_list_context_is_shared_with_the_caller(client: AsyncOpenAIClient) -> None:
    ctx: list[Any] = [1, 2]
    with REPLEnv(sandbox="local", context=ctx, client=client) as env:
        env.execute("context.append(3)")
    assert ctx == [1, 2, 3]


def test_describe_context_of_a_str() -> None:
    text = describe_context("line one\nline two\n" * 3)
    assert text.startswith("type: str, 54 chars, 6 lines\npreview (first 54 chars):\nline one")


def test_describe_context_of_a_list() -> None:
    text = describe_context(["aa", "bbbb", "c" * 1000])
    assert text.splitlines()[:2] == [
        "type: list, 3 items of type str; total length 1,006",
        "item lengths: min 2, median 4, max 1,000; first: [2, 4, 1,000]",
    ]
    assert "preview of item 0:\naa" in text


def test_describe_context_of_a_dict_and_other_values() -> None:
    text = describe_context({"doc1": "hello", "doc2": "x" * 700})
    assert text.startswith("type: dict, 2 keys; total value length 705\nkeys: ['doc1', 'doc2']")
    assert "preview of context['doc1']:\nhello" in text
    assert describe_context(None) == "type: NoneType (no context was given)"
    assert describe_context(12345).startswith("type: int, str() length 5")


def test_describe_context_preview_is_cut() -> None:
    text = describe_context("a" * 10_000, preview_chars=100)
    assert text.endswith("a" * 100 + "... [9,900 more chars]")


# -- construction and lifecycle ------------------------------------------------------------


def test_unknown_option_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="unknown REPLEnv option.*'memory_limit'.*grace_s"):
        REPLEnv(sandbox="local", memory_limit=5)


def test_unknown_sandbox_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="sandbox must be one of 'local', 'process'"):
        REPLEnv(sandbox="docker")


def test_setup_code_runs_once_and_its_failure_raises(client: AsyncOpenAIClient) -> None:
    with REPLEnv(sandbox="local", client=client, setup_code="import json\nhelper = lambda x: json.dumps(x)") as env:
        assert env.execute("print(helper([1]))").stdout == "[1]\n"
    with pytest.raises(ConfigError, match="setup_code failed"):
        REPLEnv(sandbox="local", setup_code="1 / 0")


def test_tools_are_callable_and_wrapped(client: AsyncOpenAIClient) -> None:
    class Store:
        secret = "host-only"

        def lookup(self, key: str) -> str:
            return key.upper()

    store = Store()
    with REPLEnv(sandbox="local", client=client, tools={"lookup": store.lookup}) as env:
        assert env.execute("print(lookup('abc'))").stdout == "ABC\n"
        r = env.execute("print([getattr(lookup, n, None) for n in ('secret', 'func', 'store')])")
    assert r.stdout == "[None, None, None]\n"


def test_get_of_a_missing_name_raises_key_error(env: REPLEnv) -> None:
    with pytest.raises(KeyError):
        env.get("nothing_here")


def test_closed_env_raises_env_closed_error(client: AsyncOpenAIClient) -> None:
    env = REPLEnv(sandbox="local", client=client)
    env.close()
    env.close()  # idempotent
    with pytest.raises(EnvClosedError):
        env.execute("1")
    with pytest.raises(EnvClosedError):
        env.get("context")


async def test_closed_env_raises_in_aexecute(client: AsyncOpenAIClient) -> None:
    env = REPLEnv(sandbox="local", client=client)
    env.close()
    with pytest.raises(EnvClosedError):
        await env.aexecute("1")


def test_close_stops_a_cell_running_in_another_thread() -> None:
    running = threading.Event()
    env = REPLEnv(sandbox="local", timeout=None, tools={"signal_running": running.set})
    results: list[ExecResult] = []
    runner = threading.Thread(
        target=lambda: results.append(env.execute("signal_running()\nwhile True:\n    pass"))
    )
    runner.start()
    assert running.wait(10)
    env.close()
    runner.join(timeout=10)
    assert not runner.is_alive()
    assert results[0].error is not None and "the REPL environment was closed" in results[0].error


def test_close_stops_the_worker_thread(client: AsyncOpenAIClient) -> None:
    env = REPLEnv(sandbox="local", client=client)
    env.execute("x = 1")
    before = {t.name for t in threading.enumerate()}
    env.close()
    after = {t.name for t in threading.enumerate()}
    assert any(n.startswith("rlm-repl-") for n in before - after)


def test_repl_env_and_rlm_default_to_the_same_sandbox() -> None:
    from rlm import RLM

    with REPLEnv() as env:
        rlm = RLM(api_key="k")
        try:
            assert env.sandbox == rlm.sandbox == default_sandbox()
        finally:
            rlm.close()
    assert default_sandbox() == ("process" if sys.platform.startswith(("linux", "darwin")) else "local")
