"""Usage snapshots, prices for any model, and how usage reads in a REPL or notebook."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from rich.console import Console

from rlm import RLM, AsyncOpenAIClient
from rlm.errors import ConfigError
from rlm.loop import run_sync
from rlm.testing import FakeLLMServer
from rlm.usage import ModelUsage, Price, Usage, parse_price


def test_usage_prints_readably_with_a_rounded_cost() -> None:
    usage = Usage(3, 1000, 234, 1234, 0.07547580000000001, 1, 3,
                  {"gpt-4o": ModelUsage(3, 1000, 234, 1234, 0.07547580000000001)})
    text = repr(usage)
    assert text == (
        "Usage(calls=3, tokens=1,234 (in 1,000, out 234), cost=$0.0755, retries=3, failed=1)"
    )


def test_an_unpriced_model_says_unpriced_not_zero_dollars(server: FakeLLMServer) -> None:
    client = AsyncOpenAIClient(model="my-local-model", api_key="k", base_url=server.url)
    try:
        run_sync(client.completion("ECHO hi"))
        usage = client.usage
    finally:
        client.close_sync()
    assert usage.unpriced_models == ["my-local-model"]
    assert "cost=unpriced (my-local-model)" in repr(usage)
    assert "$0.0000" not in repr(usage)
    assert usage.to_dict()["by_model"]["my-local-model"]["priced"] is False


def test_usage_renders_as_a_table_in_rich_and_html() -> None:
    usage = Usage(2, 10, 5, 15, 0.0, 0, 0, {"m": ModelUsage(2, 10, 5, 15, 0.0, priced=False)})
    console = Console(record=True, width=100)
    console.print(usage)
    out = console.export_text()
    assert "unpriced" in out and "retries 0" in out
    page = usage._repr_html_()
    assert "<table>" in page and "<td style='text-align:left'>m</td>" in page and "unpriced" in page


def test_prices_given_to_the_client_price_any_model(server: FakeLLMServer) -> None:
    client = AsyncOpenAIClient(model="vllm/qwen", api_key="k", base_url=server.url,
                               prices={"vllm/qwen": (1.0, 2.0)})
    try:
        run_sync(client.completion("ECHO abcd"))  # the fake server: 1 completion token
        usage = client.usage
    finally:
        client.close_sync()
    expected = (usage.prompt_tokens * 1.0 + usage.completion_tokens * 2.0) / 1_000_000
    assert usage.cost_usd == pytest.approx(expected)
    assert usage.unpriced_models == []


def test_a_prices_file_named_by_rlm_prices_is_used(
    server: FakeLLMServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"ollama/llama3": [0.5, 0.5]}))
    monkeypatch.setenv("RLM_PRICES", str(prices))
    client = AsyncOpenAIClient(model="ollama/llama3", api_key="k", base_url=server.url)
    assert client.price("ollama/llama3") == Price(0.5, 0.5)


def test_a_broken_prices_file_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text('{"m": "cheap"}')
    monkeypatch.setenv("RLM_PRICES", str(prices))
    with pytest.raises(ConfigError, match="price of 'm'"):
        AsyncOpenAIClient(model="m", api_key="k")


def test_a_price_spec_reads_model_equals_in_comma_out() -> None:
    assert parse_price("org/model:7b=0.15,0.6") == ("org/model:7b", Price(0.15, 0.6))
    with pytest.raises(ConfigError, match="MODEL=IN,OUT"):
        parse_price("model=0.15")


@pytest.mark.parametrize("which", ["root", "sub"])
def test_a_cost_budget_with_an_unpriced_model_is_refused_at_construction(which: str) -> None:
    priced = {"root-m": (1.0, 1.0), "sub-m": (1.0, 1.0)}
    del priced[f"{which}-m"]
    with pytest.raises(ConfigError, match=rf"{which} model '{which}-m' has no price.*--price {which}-m=IN,OUT"):
        RLM(model="root-m", recursive_model="sub-m", api_key="k", max_cost_usd=1.0, prices=priced)
    # With both priced it is built.
    RLM(model="root-m", recursive_model="sub-m", api_key="k", max_cost_usd=1.0,
        prices={"root-m": (1.0, 1.0), "sub-m": (1.0, 1.0)}).close()


def test_a_run_with_unpriced_models_shows_unpriced_in_its_views(server: FakeLLMServer) -> None:
    from rlm.display import result_html, result_rich

    server.responder = lambda m: "FINAL('done')"
    rlm = RLM(model="local-root", recursive_model="local-sub", api_key="k", base_url=server.url,
              sandbox="local")
    try:
        result = rlm.completion(context="c", query="q")
    finally:
        rlm.close()
    assert result.answer == "done"
    assert result.usage["root"].unpriced_models == ["local-root"]
    assert "cost=unpriced (local-root)" in repr(result)
    page = result_html(result)
    # The root's cost (and so the total) is unknown; the unused sub-model's $0 is true.
    assert re.search(r"Total cost</t[dh]>\s*<td[^>]*>unpriced<", page), page[:3000]
    console = Console(record=True, width=120)
    console.print(result_rich(result))
    assert "unpriced" in console.export_text()
