"""Caps that cannot be dodged: a per-call model must be priced under a cost cap, a price
never extends to another model by prefix, a sub-query cannot buy n completions for one
reservation, and REPL sessions of `rlm mcp` spend within the server's caps.

Scripted root model and echo sub-model on FakeLLMServer over real sockets; the server's
request log proves what was (and was not) sent.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
from mcp import Client, StdioServerParameters
from rlm_support import ROOT, SUB, make_rlm, repl
from serve_support import rlm_server

from rlm import RLM
from rlm.errors import UnpricedModelError
from rlm.loop import run_sync
from rlm.testing import FakeLLMServer
from rlm.usage import DEFAULT_PRICES, BudgetLedger, lookup_price

PRICES = {ROOT: (1.0, 1.0), SUB: (1.0, 1.0)}


def cell_results(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "cell_result"]


def run_cell(closing: list[RLM], code: str, **budget: Any) -> tuple[dict[str, Any], list[str]]:
    """Run one root turn whose cell is ``code``: its cell_result event, and the models
    the server was asked for."""
    events: list[dict[str, Any]] = []
    with FakeLLMServer(scripts={ROOT: [repl(code), "FINAL('done')"]}) as srv:
        rlm = make_rlm(srv, closing, prices=PRICES, on_event=events.append, max_iterations=1, **budget)
        rlm.completion("ctx", "Go.")
        return cell_results(events)[0], [r["model"] for r in srv.requests_log]


def test_an_unpriced_per_call_model_is_refused_under_a_cost_cap(closing: list[RLM]) -> None:
    result, sent = run_cell(closing, "llm_query('ECHO hi', model='unpriced-x', max_tokens=20000)",
                            max_cost_usd=0.01)
    assert "has no price" in result["error"]
    assert "unpriced-x" not in sent


def test_an_unpriced_per_call_model_fills_error_slots_in_a_batch(closing: list[RLM]) -> None:
    result, sent = run_cell(closing, "print(llm_query_batch(['ECHO a', 'ECHO b'], model='unpriced-x'))",
                            max_cost_usd=0.01)
    assert result["stdout"].count("[llm_query error: model 'unpriced-x' has no price") == 2
    assert "unpriced-x" not in sent


def test_without_a_cost_cap_an_unpriced_per_call_model_is_sent(closing: list[RLM]) -> None:
    result, sent = run_cell(closing, "print(llm_query('ECHO hi', model='unpriced-x'))", max_tokens=100_000)
    assert result["stdout"] == "hi\n"
    assert "unpriced-x" in sent


async def test_the_ledger_refuses_an_unpriced_model_when_a_parent_caps_cost() -> None:
    job = BudgetLedger(max_cost_usd=1.0, prices=PRICES, name="job")
    run = BudgetLedger(max_tokens=10_000, prices=PRICES, parent=job)
    with pytest.raises(UnpricedModelError, match="job max_cost_usd=1"):
        await run.reserve("unpriced-x", 100, 10)
    assert await run.reserve(SUB, 100, 10) is not None


def test_a_price_never_extends_to_a_model_sharing_its_prefix() -> None:
    assert lookup_price(DEFAULT_PRICES, "o3-pro") is None
    assert lookup_price(DEFAULT_PRICES, "gpt-4o-realtime-preview") is None
    assert lookup_price(DEFAULT_PRICES, "gpt-5-chat-latest") is None
    assert lookup_price(DEFAULT_PRICES, "o3") == DEFAULT_PRICES["o3"]


def test_a_dated_snapshot_is_priced_as_its_model_unless_listed() -> None:
    assert lookup_price(DEFAULT_PRICES, "gpt-4o-mini-2024-07-18") == DEFAULT_PRICES["gpt-4o-mini"]
    assert lookup_price(DEFAULT_PRICES, "o3-2025-04-16") == DEFAULT_PRICES["o3"]
    assert lookup_price(DEFAULT_PRICES, "gpt-4o-2024-05-13") == (5.00, 15.00)
    assert lookup_price(DEFAULT_PRICES, "o3-pro-2025-06-10") is None


async def test_a_reply_naming_an_unknown_model_is_charged_at_the_requested_price() -> None:
    ledger = BudgetLedger(max_cost_usd=10.0, prices={"m": (1.0, 2.0)})
    hold = await ledger.reserve("m", 400, 100)
    ledger.settle(hold, "m-served-by-another-name", 1_000_000, 1_000_000)
    assert ledger.spent_cost == pytest.approx(3.0)


@pytest.mark.parametrize(("call", "message"), [
    ("llm_query('ECHO hi', n=64, max_tokens=100)", "n=1 only"),
    ("llm_query_batch(['ECHO a'], n=2)", "n=1 only"),
    ("llm_query('ECHO hi', max_tokens=1, max_completion_tokens=20000)", "not both"),
    ("llm_query('ECHO hi', max_tokens=20000.5)", "positive int"),
])
def test_sub_query_parameters_a_reservation_cannot_see_are_refused(closing: list[RLM], call: str,
                                                                   message: str) -> None:
    result, sent = run_cell(closing, call, max_tokens=100_000)
    assert message in result["error"]
    assert SUB not in sent


def test_rlm_serve_refuses_an_unpriced_per_call_model_under_its_cost_cap() -> None:
    code = ("try:\n    llm_query('ECHO hi', model='unpriced-x', max_tokens=20000)\n"
            "except Exception as e:\n    FINAL(str(e))")
    with FakeLLMServer(scripts={ROOT: [repl(code)]}) as upstream:
        args = ["serve", "--port", "0", "--base-url", upstream.url, "--api-key", "k", "--model", ROOT,
                "--recursive-model", SUB, "--sandbox", "local", "--max-cost-usd", "0.01",
                "--price", f"{ROOT}=1,1", "--price", f"{SUB}=1,1"]
        with rlm_server(args, ready=r"listening on (http://\S+/v1)") as url:
            import openai

            with openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60) as client:
                reply = client.chat.completions.create(model="rlm", messages=[{"role": "user", "content": "Go."}])
        sent = [r["model"] for r in upstream.requests_log]
    assert "has no price" in (reply.choices[0].message.content or "")
    assert "unpriced-x" not in sent


async def mcp_session_cell(code: str, *flags: str) -> tuple[str, int]:
    """Run ``code`` in a REPL session of ``rlm mcp FLAGS`` (stdio); its stdout, and how
    many requests reached the upstream."""
    with FakeLLMServer() as upstream:
        args = ["-m", "rlm.cli", "mcp", "--base-url", upstream.url, "--api-key", "k", "--model", ROOT,
                "--recursive-model", SUB, "--price", f"{ROOT}=1,1", "--price", f"{SUB}=1,1", *flags]
        async with Client(StdioServerParameters(command=sys.executable, args=args)) as client:
            sid = (await client.call_tool("repl_open", {"context": "z"})).structured_content["session_id"]
            ran = await client.call_tool("repl_exec", {"session_id": sid, "code": code})
        return ran.structured_content["stdout"], upstream.requests


async def test_mcp_repl_sessions_spend_within_max_tokens() -> None:
    stdout, sent = await mcp_session_cell(
        "rs = llm_query_batch([f'ECHO {i} ' + 'x' * 200 for i in range(40)])\nprint(rs[-1][:60])",
        "--max-tokens", "1000")
    assert stdout.startswith("[llm_query error: budget exhausted (session max_tokens=1000)")
    assert sent < 40


async def test_mcp_repl_sessions_refuse_an_unpriced_model_under_max_cost_usd() -> None:
    stdout, sent = await mcp_session_cell("print(llm_query_batch(['ECHO a'], model='unpriced-x')[0][:60])",
                                          "--max-cost-usd", "0.01")
    assert stdout.startswith("[llm_query error: model 'unpriced-x' has no price")
    assert sent == 0


def test_a_plain_repl_env_refuses_n_completions_too() -> None:
    # REPLEnv(client=...) has no budget of its own, but still refuses n completions.
    from rlm import AsyncOpenAIClient, REPLEnv

    with FakeLLMServer() as srv:
        client = AsyncOpenAIClient(model=SUB, api_key="k", base_url=srv.url, max_retries=0)
        try:
            with REPLEnv(client=client) as env:
                r = env.execute("llm_query('ECHO hi', n=3)")
        finally:
            run_sync(client.close())
        assert srv.requests == 0
    assert r.error is not None and "n=1 only" in r.error
