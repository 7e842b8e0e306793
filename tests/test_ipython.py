"""The IPython face of rlm through a real InteractiveShell: ``%rlm_config``, ``%%rlm``,
rich HTML display of results, and the ``rlm repl`` namespace, against FakeLLMServer."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from rlm import AsyncOpenAIClient, REPLEnv
from rlm.ipython import NotebookConfig, repl_namespace
from rlm.testing import FakeLLMServer

ROOT = "magic-root"
SUB = "magic-sub"
# The root reads every line through the sub-model (the echo responder) and joins them.
ROOT_SCRIPT = [
    "Reading each line.\n```repl\nlines = context.splitlines()\n"
    "echoed = llm_query_batch(['ECHO ' + line for line in lines])\nprint(echoed)\n```",
    "```repl\nFINAL(' | '.join(echoed))\n```",
]
SECRET = "sk-test-0123456789abcdef"


@pytest.fixture(scope="module")
def shell(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InteractiveShell]:
    """One real IPython shell for the module, with ``%load_ext rlm`` done."""
    mp = pytest.MonkeyPatch()
    # The shell keeps its history in IPYTHONDIR: never the developer's own.
    mp.setenv("IPYTHONDIR", str(tmp_path_factory.mktemp("ipython")))
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "rlm")
    yield shell
    InteractiveShell.clear_instance()
    mp.undo()


@pytest.fixture
def ip(shell: InteractiveShell) -> Iterator[InteractiveShell]:
    """The shared shell with a fresh ``%rlm_config`` and no leftover variables."""
    magics = shell.magics_manager.registry["RLMMagics"]
    magics.config_values = NotebookConfig()
    before = set(shell.user_ns)
    yield shell
    for name in set(shell.user_ns) - before:
        del shell.user_ns[name]


@pytest.fixture
def llm() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(scripts={ROOT: ROOT_SCRIPT}) as srv:
        yield srv


def configure(ip: InteractiveShell, srv: FakeLLMServer) -> None:
    ip.run_line_magic(
        "rlm_config",
        f"--model {ROOT} --recursive-model {SUB} --base-url {srv.url} --api-key k --sandbox local",
    )


# -- %rlm_config ------------------------------------------------------------------------


def test_rlm_config_sets_values_and_shows_them_with_the_key_masked(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    ip.run_line_magic(
        "rlm_config", f"model=gpt-4o recursive_model=gpt-4o-mini base_url=http://h/v1 api_key={SECRET}"
    )
    set_out = capsys.readouterr().out
    ip.run_line_magic("rlm_config", "")
    shown = capsys.readouterr().out
    for out in (set_out, shown):
        assert "model=gpt-4o " in out
        assert "recursive_model=gpt-4o-mini" in out
        assert "base_url=http://h/v1" in out
        assert "api_key=sk-...cdef" in out
        assert SECRET not in out


def test_rlm_config_without_a_key_says_so(ip: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    ip.run_line_magic("rlm_config", "")
    assert "api_key=(not set)" in capsys.readouterr().out


def test_a_short_key_is_hidden_entirely(ip: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    ip.run_line_magic("rlm_config", "--api-key local")
    out = capsys.readouterr().out
    assert "api_key=***" in out
    assert "local" not in out


def test_rlm_config_rejects_an_unknown_option_and_lists_the_valid_ones(ip: InteractiveShell) -> None:
    with pytest.raises(UsageError, match=r"unknown option --colour; options are --model, "):
        ip.run_line_magic("rlm_config", "--colour blue")
    with pytest.raises(UsageError, match="--sandbox must be one of local, process"):
        ip.run_line_magic("rlm_config", "sandbox=docker")
    with pytest.raises(UsageError, match="--model needs a value"):
        ip.run_line_magic("rlm_config", "--model")


# -- %%rlm ------------------------------------------------------------------------------


def test_rlm_cell_answers_the_query_over_context_and_stores_the_result_in__rlm(
    ip: InteractiveShell, llm: FakeLLMServer
) -> None:
    configure(ip, llm)
    ip.user_ns["context"] = "alpha\nbeta\ngamma"
    result = ip.run_cell_magic("rlm", "", "Repeat every line.\n")
    assert result.answer == "alpha | beta | gamma"
    assert ip.user_ns["_rlm"] is result
    assert result.sub_calls == 3
    root_requests = [r for r in llm.requests_log if r["model"] == ROOT]
    assert "Repeat every line." in root_requests[0]["messages"][-1]["content"]


def test_rlm_cell_takes_the_context_variable_and_output_name_from_its_options(
    ip: InteractiveShell, llm: FakeLLMServer
) -> None:
    configure(ip, llm)
    ip.user_ns["doc"] = "one\ntwo"
    result = ip.run_cell_magic("rlm", "--context doc --out answer", "Repeat.")
    assert ip.user_ns["answer"] is result
    assert result.answer == "one | two"
    assert "_rlm" not in ip.user_ns


def test_rlm_cell_options_override_the_config(ip: InteractiveShell, llm: FakeLLMServer) -> None:
    ip.run_line_magic("rlm_config", "--model not-scripted --base-url http://127.0.0.1:9/v1 --api-key k")
    ip.user_ns["context"] = "x"
    result = ip.run_cell_magic("rlm", f"--model {ROOT} --recursive-model {SUB} --base-url {llm.url}", "q")
    assert result.answer == "x"
    assert {r["model"] for r in llm.requests_log} == {ROOT, SUB}


def test_a_cell_run_shows_the_result_as_the_cells_output(
    ip: InteractiveShell, llm: FakeLLMServer
) -> None:
    configure(ip, llm)
    ip.user_ns["context"] = "a\nb"
    executed = ip.run_cell("%%rlm\nRepeat.")
    assert executed.success
    assert executed.result is ip.user_ns["_rlm"]
    assert executed.result.answer == "a | b"


def test_rlm_cell_verbose_shows_the_iterations_live(
    ip: InteractiveShell, llm: FakeLLMServer, capsys: pytest.CaptureFixture[str]
) -> None:
    configure(ip, llm)
    ip.user_ns["context"] = "a"
    ip.run_cell_magic("rlm", "--verbose", "Repeat.")
    out = capsys.readouterr().out
    assert "llm_query_batch" in out  # the root's code, shown as it ran
    assert "FINAL" in out


def test_rlm_cell_with_a_missing_context_variable_says_which(ip: InteractiveShell, llm: FakeLLMServer) -> None:
    configure(ip, llm)
    with pytest.raises(UsageError, match=r"no variable named 'report' in this notebook.*--context VAR"):
        ip.run_cell_magic("rlm", "--context report", "q")
    assert llm.requests == 0


def test_rlm_cell_usage_errors_are_one_line_each(ip: InteractiveShell, llm: FakeLLMServer) -> None:
    configure(ip, llm)
    ip.user_ns["context"] = "x"
    cases = {
        "--temperature 0": r"unknown option --temperature; options are --context, ",
        "--verbose=yes": "--verbose is a flag and takes no value",
        "--max-iterations many": "--max-iterations needs a whole number, not 'many'",
        "--out 2x": "--out needs a variable name, not '2x'",
        "stray": "unexpected argument 'stray'",
        "--context 'unclosed": "cannot parse",
    }
    for line, message in cases.items():
        with pytest.raises(UsageError, match=message):
            ip.run_cell_magic("rlm", line, "q")
    with pytest.raises(UsageError, match="the cell body is the query, and it is empty"):
        ip.run_cell_magic("rlm", "", "  \n")
    assert llm.requests == 0


def test_rlm_cell_without_any_key_says_how_to_set_one(ip: InteractiveShell, llm: FakeLLMServer) -> None:
    ip.run_line_magic("rlm_config", f"--model {ROOT} --base-url {llm.url}")
    ip.user_ns["context"] = "x"
    with pytest.raises(UsageError, match=r"no API key; run %rlm_config api_key=\.\.\. or set OPENAI_API_KEY"):
        ip.run_cell_magic("rlm", "", "q")
    assert llm.requests == 0


def test_a_usage_error_in_a_cell_is_reported_without_running_anything(
    ip: InteractiveShell, llm: FakeLLMServer, capsys: pytest.CaptureFixture[str]
) -> None:
    configure(ip, llm)
    executed = ip.run_cell("%%rlm --context nowhere\nq")
    assert isinstance(executed.error_in_exec, UsageError)
    assert "no variable named 'nowhere'" in capsys.readouterr().err
    assert llm.requests == 0


# -- display ----------------------------------------------------------------------------


def test_an_rlm_result_renders_as_html_with_the_answer_first(ip: InteractiveShell, llm: FakeLLMServer) -> None:
    configure(ip, llm)
    ip.user_ns["context"] = "needle\nhay"
    result = ip.run_cell_magic("rlm", "", "Repeat.")
    formatted, _ = ip.display_formatter.format(result)
    page = formatted["text/html"]
    assert "needle | hay" in page
    assert page.index("needle | hay") < page.index("llm_query_batch")  # answer, then the iterations
    assert "RLMResult(answer='needle | hay'" in formatted["text/plain"]


def test_an_exec_result_renders_as_html_with_its_output(
    ip: InteractiveShell, server: FakeLLMServer
) -> None:
    client = AsyncOpenAIClient(model="m", base_url=server.url, api_key="k")
    with REPLEnv(context="ctx", client=client) as env:
        ok = env.execute("print(llm_query_batch(['ECHO <b>bold</b>', 'ECHO two']))")
        failed = env.execute("1 / 0")
    client.close_sync()
    page = ip.display_formatter.format(ok)[0]["text/html"]
    assert "&lt;b&gt;bold&lt;/b&gt;" in page  # escaped, never live markup
    assert "2 sub-calls" in page
    error_page = ip.display_formatter.format(failed)[0]["text/html"]
    assert "ZeroDivisionError" in error_page


def test_rlm_cell_with_a_schema_variable_gives_the_validated_output(ip: InteractiveShell) -> None:
    script = ["```repl\nFINAL(context.splitlines())\n```"]
    with FakeLLMServer(scripts={ROOT: script}) as srv:
        configure(ip, srv)
        ip.user_ns["context"] = "a\nb"
        ip.user_ns["Lines"] = list[str]
        result = ip.run_cell_magic("rlm", "--schema Lines", "List the lines.")
        system = srv.requests_log[0]["messages"][0]["content"]
    assert result.output == ["a", "b"]
    assert '"items"' in system  # the root was shown the JSON Schema


def test_rlm_cell_with_a_schema_that_is_no_variable_or_no_schema_says_so(
    ip: InteractiveShell, llm: FakeLLMServer
) -> None:
    configure(ip, llm)
    ip.user_ns["context"] = "x"
    with pytest.raises(UsageError, match="no variable named 'Missing'"):
        ip.run_cell_magic("rlm", "--schema Missing", "q")
    ip.user_ns["NotASchema"] = "list of str"
    with pytest.raises(UsageError, match="--schema NotASchema: schema must be"):
        ip.run_cell_magic("rlm", "--schema NotASchema", "q")
    assert llm.requests == 0


# -- the rlm repl namespace ---------------------------------------------------------------


def test_the_repl_namespace_has_the_root_models_tools_on_one_client(server: FakeLLMServer) -> None:
    client = AsyncOpenAIClient(model="m", base_url=server.url, api_key="k")
    ns = repl_namespace("the context", client)
    try:
        assert ns["context"] == "the context"
        assert ns["client"] is client
        assert ns["llm_query"]("ECHO one") == "one"
        assert ns["llm_query_batch"](["ECHO a", "ECHO b"]) == ["a", "b"]
        assert asyncio.run(ns["llm_query_async"]("ECHO c")) == "c"
        assert asyncio.run(ns["llm_query_batch_async"](["ECHO d", "ECHO e"])) == ["d", "e"]
        assert client.usage.calls == 6
    finally:
        client.close_sync()


def test_the_repl_namespace_takes_a_schema_like_repl_code() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}

    def answer(messages: list[dict], response_format: dict) -> dict:
        return {"n": len(messages[-1]["content"])}

    with FakeLLMServer(json_responder=answer) as srv:
        client = AsyncOpenAIClient(model="m", base_url=srv.url, api_key="k")
        ns = repl_namespace("", client)
        try:
            assert ns["llm_query"]("abc", schema=schema) == {"n": 3}
            assert ns["llm_query_batch"](["a", "ab"], schema=schema) == [{"n": 1}, {"n": 2}]
            assert asyncio.run(ns["llm_query_batch_async"](["abcd"], schema=schema)) == [{"n": 4}]
        finally:
            client.close_sync()


def test_a_failed_item_in_a_repl_batch_is_an_error_string(server: FakeLLMServer) -> None:
    client = AsyncOpenAIClient(model="m", base_url=server.url, api_key="k", max_retries=0)
    server.inject("500")
    try:
        replies = repl_namespace("", client)["llm_query_batch"](["ECHO a"])
    finally:
        client.close_sync()
    assert replies[0].startswith("[llm_query error: ")



def test_start_repl_inside_a_running_shell_says_what_to_do_instead(
    ip: InteractiveShell, server: FakeLLMServer
) -> None:
    from rlm.errors import ConfigError
    from rlm.ipython import start_repl

    client = AsyncOpenAIClient(model="m", base_url=server.url, api_key="k")
    try:
        with pytest.raises(ConfigError, match=r"get_ipython\(\)\.push\(repl_namespace\(context, client\)\)"):
            start_repl("ctx", client)
    finally:
        client.close_sync()


# -- the cache option -------------------------------------------------------------------


def test_rlm_config_cache_dir_makes_a_repeated_cell_send_nothing(
    ip: InteractiveShell, llm: FakeLLMServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    configure(ip, llm)
    ip.run_line_magic("rlm_config", f"cache={tmp_path}")
    assert f"cache={tmp_path}" in capsys.readouterr().out
    ip.user_ns["context"] = "alpha\nbeta"
    first = ip.run_cell_magic("rlm", "", "Repeat every line.")
    sent = llm.requests
    again = ip.run_cell_magic("rlm", "", "Repeat every line.")
    assert llm.requests == sent
    assert again.answer == first.answer == "alpha | beta"
    assert again.total_usage.cached_calls == 2 + 2
    fresh = ip.run_cell_magic("rlm", "--cache off", "Repeat every line.")
    assert fresh.total_usage.cached_calls == 0 and llm.requests == 2 * sent
