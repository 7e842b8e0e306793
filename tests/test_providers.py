"""Native providers: one model string picks Anthropic, Azure OpenAI, Gemini or OpenAI.

Everything runs against FakeLLMServer, which speaks each provider's wire format (the
Anthropic Messages API and Message Batches, Azure's deployment and v1 URLs, Gemini's
OpenAI-compatible endpoint); the official anthropic and openai SDKs are run against it
too, so the fake and the adapters are checked against the real clients.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from rlm_support import repl
from serve_support import NEEDLE, needle_messages, rlm_server
from serve_support import scripts as serve_scripts
from serve_support import sub_model as needle_sub_model

from rlm import RLM, AsyncOpenAIClient, REPLEnv
from rlm.batchapi.wire import wire_for
from rlm.errors import ConfigError, LLMError, RateLimitError
from rlm.loop import run_sync
from rlm.providers import Request, adapter_class, qualified_model, resolve_model
from rlm.providers.anthropic import messages_body
from rlm.testing import BatchOptions, FakeLLMServer, Fault, rlm_responder

ROOT, SUB = "claude-root", "claude-sub"
# Three root turns: fan out, look at the result, answer; the sub model echoes.
TURN_1 = repl("parts = llm_query_batch(['ECHO ' + w for w in context.split()[:3]])\nprint(parts)")
TURN_2 = repl("joined = '-'.join(parts)\nprint(joined)")
TURN_3 = repl("FINAL(joined)")
PRICES = {ROOT: (3.0, 15.0), SUB: (1.0, 5.0)}


def scripted(**options: Any) -> FakeLLMServer:
    return FakeLLMServer(scripts={ROOT: [TURN_1, TURN_2, TURN_3]}, **options)


def entries(srv: FakeLLMServer, model: str) -> list[dict[str, Any]]:
    return [e for e in srv.requests_log if e["model"] == model]


def prompt_tokens(usage: dict[str, Any]) -> int:
    return (usage["input_tokens"] + usage["cache_read_input_tokens"]
            + usage["cache_creation_input_tokens"])


@pytest.fixture
def closing_rlms() -> Iterator[list[RLM]]:
    made: list[RLM] = []
    yield made
    for rlm in made:
        rlm.close()


# -- model strings ---------------------------------------------------------------------


def test_only_registered_provider_names_are_prefixes() -> None:
    assert resolve_model("anthropic/claude-sonnet-4-5") == ("anthropic", "claude-sonnet-4-5")
    assert resolve_model("azure/my-deployment") == ("azure", "my-deployment")
    assert resolve_model("gemini/gemini-2.5-flash") == ("gemini", "gemini-2.5-flash")
    assert resolve_model("openai/gpt-5-mini") == ("openai", "gpt-5-mini")
    # A vLLM model name keeps today's behaviour: OpenAI-compatible, sent as written.
    assert resolve_model("meta-llama/Llama-3.1-8B") == ("openai", "meta-llama/Llama-3.1-8B")
    assert resolve_model("gpt-4o") == ("openai", "gpt-4o")
    # One prefix comes off: a router's own provider/model names go through openai/.
    assert resolve_model("openai/anthropic/claude-3.5") == ("openai", "anthropic/claude-3.5")
    assert qualified_model("openai", "anthropic/claude-3.5") == "openai/anthropic/claude-3.5"
    assert qualified_model("openai", "gpt-4o") == "gpt-4o"
    assert qualified_model("anthropic", ROOT) == f"anthropic/{ROOT}"


def test_a_prefixed_model_picks_the_providers_key_variable_and_names_it_when_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY"):
        RLM(model="anthropic/claude-sonnet-4-5")
    with pytest.raises(ConfigError, match="GEMINI_API_KEY"):
        RLM(model="gemini/gemini-2.5-flash")
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "k")
    with pytest.raises(ConfigError, match="AZURE_OPENAI_ENDPOINT"):
        RLM(model="azure/my-deployment")


def test_a_sub_model_on_another_provider_without_a_key_says_to_use_endpoints() -> None:
    with pytest.raises(ConfigError, match=r"sub model is on openai/.*endpoints=\{'openai'"):
        RLM(model=f"anthropic/{ROOT}", recursive_model="openai/gpt-5-mini", api_key="k",
            base_url="http://127.0.0.1:9")


def test_endpoints_must_name_known_providers_and_keys() -> None:
    with pytest.raises(ConfigError, match="unknown provider 'bedrock'"):
        RLM(model="gpt-4o", api_key="k", endpoints={"bedrock": {"api_key": "x"}})
    with pytest.raises(ConfigError, match="unknown keys api_version"):
        RLM(model="gpt-4o", api_key="k", endpoints={"azure": {"api_version": "v1"}})


# -- Anthropic Messages ----------------------------------------------------------------


def test_a_run_on_anthropic_answers_through_messages_reading_the_cache_from_turn_two(
    closing_rlms: list[RLM],
) -> None:
    # This run's prompts are under the 1,024 tokens Anthropic caches at the least; a
    # lower minimum lets three short turns show what long runs get.
    with scripted(anthropic_cache_min_tokens=256) as srv:
        rlm = RLM(model=f"anthropic/{ROOT}", recursive_model=f"anthropic/{SUB}",
                  base_url=srv.root_url, api_key="k", prices=PRICES, sandbox="local")
        closing_rlms.append(rlm)
        result = rlm.completion(context="alpha beta gamma delta", query="Join three words.")
        stats = srv.stats()
        roots, subs = entries(srv, ROOT), entries(srv, SUB)
    assert result.answer == "alpha-beta-gamma"
    assert (rlm.model, rlm.recursive_model) == (ROOT, SUB)
    assert {e["path"] for e in roots + subs} == {"/v1/messages"}
    assert stats["requests"] == len(roots) + len(subs) == 3 + 3
    # The system prompt is top level with a breakpoint; each later turn reads the
    # earlier ones' prefix from the prompt cache.
    assert all(e["params"]["system"][-1]["cache_control"] == {"type": "ephemeral"}
               for e in roots)
    reads = [e["usage"]["cache_read_input_tokens"] for e in roots]
    assert reads[0] == 0 and all(r > 0 for r in reads[1:])
    assert reads[2] > reads[1]
    # Usage counts every prompt token once (read, written or neither), and costs them.
    root_in = sum(prompt_tokens(e["usage"]) for e in roots)
    root_out = sum(e["usage"]["output_tokens"] for e in roots)
    sub_in = sum(prompt_tokens(e["usage"]) for e in subs)
    sub_out = sum(e["usage"]["output_tokens"] for e in subs)
    usage = result.usage
    assert (usage["root"].prompt_tokens, usage["root"].completion_tokens) == (root_in, root_out)
    assert (usage["sub"].prompt_tokens, usage["sub"].completion_tokens) == (sub_in, sub_out)
    # Claude's prompt cache is priced at Anthropic's multipliers: reads at 0.1x input,
    # writes at 1.25x, the rest at list.
    def cost(rows: list[dict[str, Any]], pin: float, pout: float) -> float:
        usd = 0.0
        for e in rows:
            u = e["usage"]
            usd += (u["input_tokens"] * pin + u["cache_read_input_tokens"] * pin * 0.1
                    + u["cache_creation_input_tokens"] * pin * 1.25 + u["output_tokens"] * pout)
        return usd / 1e6

    expected = cost(roots, 3.0, 15.0) + cost(subs, 1.0, 5.0)
    assert usage["root"].cost_usd + usage["sub"].cost_usd == pytest.approx(expected)
    assert usage["root"].cached_input_tokens == sum(reads)
    assert expected < (root_in * 3.0 + root_out * 15.0 + sub_in * 1.0 + sub_out * 5.0) / 1e6


def test_a_mixed_run_sends_root_and_sub_each_to_its_own_endpoint_with_its_own_key(
    closing_rlms: list[RLM],
) -> None:
    with scripted() as claude, FakeLLMServer() as oai:
        rlm = RLM(model=f"anthropic/{ROOT}", recursive_model="openai/gpt-5-mini",
                  base_url=claude.root_url, api_key="claude-key-AAAA",
                  endpoints={"openai": {"base_url": oai.url, "api_key": "openai-key-BBBB"}},
                  sandbox="local")
        closing_rlms.append(rlm)
        result = rlm.completion(context="one two three", query="Join three words.")
        on_claude, on_oai, oai_url = claude.requests_log, oai.requests_log, oai.url
    assert result.answer == "one-two-three"
    assert {(e["model"], e["path"], e["key_hint"], tuple(e["auth_headers"]))
            for e in on_claude} == {(ROOT, "/v1/messages", "AAAA", ("x-api-key",))}
    assert {(e["model"], e["path"], e["key_hint"], tuple(e["auth_headers"]))
            for e in on_oai} == {("gpt-5-mini", "/v1/chat/completions", "BBBB",
                                  ("authorization",))}
    assert (len(on_claude), len(on_oai)) == (3, 3)
    # A Ray worker rebuilds the same pair from the settings alone.
    settings = rlm.settings()
    assert (settings["model"], settings["recursive_model"]) == (f"anthropic/{ROOT}", "gpt-5-mini")
    assert settings["endpoints"]["openai"] == {"base_url": oai_url, "api_key": "openai-key-BBBB"}


def test_system_first_merged_turns_max_tokens_and_a_breakpoint_on_the_newest_user_turn(
    server: FakeLLMServer,
) -> None:
    conversation = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "ECHO one"},
        {"role": "user", "content": "ECHO two"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "ECHO three"},
    ]

    async def ask() -> list[str]:
        async with AsyncOpenAIClient(model="anthropic/claude-haiku-4-5", api_key="k",
                                     base_url=server.root_url) as client:
            return [await client.completion(conversation),
                    await client.completion("ECHO alone", max_tokens=50)]

    assert run_sync(ask()) == ["three", "alone"]
    history, alone = server.requests_log
    assert history["params"]["system"] == [
        {"type": "text", "text": "Be terse.", "cache_control": {"type": "ephemeral"}}]
    sent = history["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert [b["text"] for b in sent[0]["content"]] == ["ECHO one", "ECHO two"]
    assert sent[-1]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    assert "cache_control" not in json.dumps(sent[:-1])
    assert history["params"]["max_tokens"] == 16384
    # A one-turn prompt (a sub-query) marks nothing: nothing would read it again.
    assert "cache_control" not in json.dumps(alone["messages"])
    assert alone["params"]["max_tokens"] == 50


@pytest.mark.parametrize("kind", ["429", "529"])
def test_a_429_or_529_from_anthropic_is_retried(server: FakeLLMServer, kind: str) -> None:
    server.inject(kind, 2, retry_after=0 if kind == "429" else None)

    async def ask() -> tuple[str, Any]:
        async with AsyncOpenAIClient(model=f"anthropic/{ROOT}", api_key="k",
                                     base_url=server.root_url) as client:
            return await client.completion("ECHO still here"), client.usage

    text, usage = run_sync(ask())
    assert text == "still here"
    assert server.stats()["faults_served"] == 2
    assert server.stats()["requests"] == 3
    assert usage.calls == 1


def test_a_429_that_outlasts_the_retries_is_a_rate_limit_error(server: FakeLLMServer) -> None:
    server.inject("429", 5, retry_after=0)

    async def ask() -> str:
        async with AsyncOpenAIClient(model=f"anthropic/{ROOT}", api_key="k",
                                     base_url=server.root_url, retry_timeout_s=0.0) as client:
            return await client.completion("ECHO x")

    with pytest.raises(RateLimitError, match="rate limit"):
        run_sync(ask())


def test_prompt_is_too_long_reaches_the_root_as_the_sub_window_message(
    closing_rlms: list[RLM],
) -> None:
    turns = [repl("parts = llm_query_batch(['ECHO hello'])\nFINAL(parts[0])")]
    with FakeLLMServer(lambda messages: Fault("context_length"), scripts={ROOT: turns}) as srv:
        rlm = RLM(model=f"anthropic/{ROOT}", recursive_model=f"anthropic/{SUB}",
                  base_url=srv.root_url, api_key="k", sandbox="local", sub_window_chars=1000)
        closing_rlms.append(rlm)
        result = rlm.completion(context="x", query="q")
    assert "prompt of 10 chars exceeds the sub-model's window of about 1,000 chars" in result.answer


def test_a_typed_sub_query_is_a_forced_tool_call_whose_input_is_the_answer(
    closing_rlms: list[RLM],
) -> None:
    obj = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    arr = {"type": "array", "items": {"type": "integer"}}
    code = (f"a = llm_query('count', schema={obj!r})\n"
            f"b = llm_query('list', schema={arr!r})\n"
            "FINAL(str(a['n']) + ':' + ','.join(map(str, b)))")

    def answer(messages: list[Any], response_format: dict[str, Any]) -> Any:
        schema = response_format["json_schema"]["schema"]
        if "n" in schema.get("properties", {}):
            return {"n": 7}
        # A schema whose root is not an object sits under "answer" in the tool's input.
        assert schema["properties"]["answer"] == arr
        return {"answer": [1, 2, 3]}

    with FakeLLMServer(scripts={ROOT: [repl(code)]}, json_responder=answer) as srv:
        rlm = RLM(model=f"anthropic/{ROOT}", recursive_model=f"anthropic/{SUB}",
                  base_url=srv.root_url, api_key="k", sandbox="local")
        closing_rlms.append(rlm)
        result = rlm.completion(context="x", query="q")
        subs = entries(srv, SUB)
    assert result.answer == "7:1,2,3"
    assert [e["params"]["tool_choice"]["type"] for e in subs] == ["tool", "tool"]
    assert [e["params"]["tools"][0]["input_schema"]["type"] for e in subs] == ["object"] * 2


def test_a_repl_env_on_an_anthropic_client_fans_out_through_messages(
    server: FakeLLMServer,
) -> None:
    client = AsyncOpenAIClient(model=f"anthropic/{SUB}", api_key="k", base_url=server.root_url)
    try:
        with REPLEnv(context="", client=client, sandbox="local") as env:
            result = env.execute("print(llm_query_batch(['ECHO a', 'ECHO b', 'ECHO c']))")
    finally:
        client.close_sync()
    assert result.error is None and result.stdout.strip() == "['a', 'b', 'c']"
    assert {(e["path"], e["model"]) for e in server.requests_log} == {("/v1/messages", SUB)}


# -- the official SDK against the adapter and the fake -----------------------------------


async def test_the_anthropic_sdk_sends_the_adapters_body_and_reads_what_the_adapter_reads(
    server: FakeLLMServer,
) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    server.json_responder = lambda messages, response_format: {"n": 3}
    request = Request({"model": ROOT, "messages": [
        {"role": "system", "content": "Count."}, {"role": "user", "content": "three things"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "N", "schema": schema}}})
    body = messages_body(request.body)
    adapter = adapter_class("anthropic")(server.root_url, "k")
    async with anthropic.AsyncAnthropic(api_key="k", base_url=server.root_url,
                                        max_retries=0) as claude:
        message = await claude.messages.create(**body)
    assert message.stop_reason == "tool_use"
    assert message.content[0].type == "tool_use" and message.content[0].input == {"n": 3}
    reply = adapter.parse_reply(message.model_dump(), request)
    assert json.loads(reply.text) == {"n": 3}
    assert reply.prompt_tokens == message.usage.input_tokens + (
        message.usage.cache_read_input_tokens or 0) + (message.usage.cache_creation_input_tokens or 0)
    assert reply.completion_tokens == message.usage.output_tokens


async def test_message_batch_lines_the_adapter_builds_run_through_the_anthropic_sdk() -> None:
    async with FakeLLMServer(batches=BatchOptions(delay=0)) as srv:
        adapter = adapter_class("anthropic")(srv.root_url, "k")
        wire = wire_for(adapter)
        requests = [Request({"model": ROOT, "messages": [{"role": "user", "content": f"ECHO w{i}"}]})
                    for i in range(3)]
        lines = [json.loads(wire.line(f"q{i}", r)) for i, r in enumerate(requests)]
        async with anthropic.AsyncAnthropic(api_key="k", base_url=srv.root_url,
                                            max_retries=0) as claude:
            created = await claude.messages.batches.create(requests=lines)
            done = await claude.messages.batches.retrieve(created.id)
            results = {r.custom_id: r.result async for r in await claude.messages.batches.results(
                created.id)}
        await wire.close()
    assert done.processing_status == "ended"
    texts = {k: adapter.parse_reply(v.message.model_dump(), requests[int(k[1:])]).text
             for k, v in results.items()}
    assert texts == {"q0": "w0", "q1": "w1", "q2": "w2"}


# -- the command line, the server, batch mode --------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.endswith(("_API_KEY", "_BASE_URL")) and k != "RLM_MODEL"}
    env.update(extra)
    return env


def test_rlm_run_with_an_anthropic_model_takes_its_key_from_anthropic_api_key(
    tmp_path: Path,
) -> None:
    context = tmp_path / "doc.txt"
    context.write_text("The vault code is 4711.\nNothing else here.\n", encoding="utf-8")
    with FakeLLMServer(rlm_responder) as srv:
        done = subprocess.run(
            [sys.executable, "-m", "rlm", "run", "--model", "anthropic/claude-sonnet-4-5",
             "--base-url", srv.root_url, "--context", str(context), "--query",
             "What is the vault code?", "--sandbox", "local"],
            capture_output=True, text=True, timeout=120,
            env=_env(ANTHROPIC_API_KEY="from-env-CCCC"))
        log = srv.requests_log
    assert done.returncode == 0, done.stderr
    assert "4711" in done.stdout
    assert {(e["path"], e["key_hint"]) for e in log} == {("/v1/messages", "CCCC")}


def test_rlm_run_without_the_providers_key_names_the_variable(tmp_path: Path) -> None:
    context = tmp_path / "doc.txt"
    context.write_text("x", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "rlm", "run", "--model", "gemini/gemini-2.5-flash",
         "--context", str(context), "--query", "q"],
        capture_output=True, text=True, timeout=60, env=_env())
    assert done.returncode == 2
    assert "GEMINI_API_KEY" in done.stderr


def test_rlm_run_with_a_sub_model_on_another_provider_names_that_providers_variable(
    tmp_path: Path,
) -> None:
    context = tmp_path / "doc.txt"
    context.write_text("x", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "rlm", "run", "--model", f"anthropic/{ROOT}", "--api-key", "k",
         "--recursive-model", "openai/gpt-5-mini", "--context", str(context), "--query", "q"],
        capture_output=True, text=True, timeout=60, env=_env())
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "rlm: no API key for the sub model openai/gpt-5-mini: set OPENAI_API_KEY (and "
        "--endpoint openai=URL for an endpoint other than its default)"]


def test_rlm_serve_with_an_anthropic_upstream_answers_the_openai_sdk() -> None:
    with FakeLLMServer(needle_sub_model, scripts={ROOT: serve_scripts()["root"]}) as upstream:
        args = ["serve", "--port", "0", "--auth-key", "serve-key", "--base-url",
                upstream.root_url, "--api-key", "upstream-key", "--model", f"anthropic/{ROOT}",
                "--recursive-model", f"anthropic/{SUB}", "--sandbox", "local"]
        with rlm_server(args, ready=r"listening on (http://\S+/v1)") as url:
            with openai.OpenAI(base_url=url, api_key="serve-key", max_retries=0,
                               timeout=60) as client:
                listed = [m.id for m in client.models.list()]
                reply = client.chat.completions.create(model="rlm", messages=needle_messages())
                with pytest.raises(openai.NotFoundError, match="not openai/"):
                    client.chat.completions.create(model="rlm:openai/gpt-4o",
                                                   messages=needle_messages())
        log = upstream.requests_log
    assert listed == ["rlm", f"rlm:anthropic/{ROOT}"]
    assert reply.choices[0].message.content == NEEDLE
    assert {e["path"] for e in log} == {"/v1/messages"}
    assert {e["model"] for e in log} == {ROOT, SUB}


def test_rlm_batch_with_batch_api_sends_anthropic_models_through_message_batches(
    tmp_path: Path,
) -> None:
    turn_1 = repl("parts = llm_query_batch(['ECHO ' + w for w in context.split()[:2]])")
    turn_2 = repl("FINAL('-'.join(parts))")
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"id": f"t{i}", "query": "Join.",
                                         "context": f"a{i} b{i} rest"}) + "\n"
                             for i in range(4)), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    with FakeLLMServer(scripts={ROOT: [turn_1, turn_2]},
                       batches=BatchOptions(delay=0.1, seed=3)) as srv:
        done = subprocess.run(
            [sys.executable, "-m", "rlm", "batch", str(tasks), "--out", str(out),
             "--base-url", srv.root_url, "--model", f"anthropic/{ROOT}",
             "--recursive-model", f"anthropic/{SUB}", "--sandbox", "local", "--batch-api",
             "--batch-poll-s", "0.05", "--quiet"],
            capture_output=True, text=True, timeout=180, env=_env(ANTHROPIC_API_KEY="k"))
        stats = srv.stats()
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["answer"] for r in records) == [f"a{i}-b{i}" for i in range(4)]
    assert stats["requests"] == 0  # nothing live: every call went through Message Batches
    assert stats["models"][ROOT]["batch_lines"] == 8
    assert stats["models"][SUB]["batch_lines"] == 8


# -- Azure OpenAI and Gemini -------------------------------------------------------------


def test_azure_posts_to_the_deployment_url_with_api_version_and_an_api_key_header(
    server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", server.root_url)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "azure-key-DDDD")

    async def ask() -> list[str]:
        async with AsyncOpenAIClient(model="azure/my-gpt") as deployment, \
                AsyncOpenAIClient(model="azure/my-gpt",
                                  base_url=server.root_url + "/openai/v1") as v1, \
                AsyncOpenAIClient(model="azure/other",
                                  base_url=server.root_url + "?api-version=2025-04-01-preview"
                                  ) as pinned:
            return [await deployment.completion("ECHO a"), await v1.completion("ECHO b"),
                    await pinned.completion("ECHO c")]

    assert run_sync(ask()) == ["a", "b", "c"]
    shapes = [(e["path"], e["query"], e["auth_headers"], e["key_hint"], e["model"])
              for e in server.requests_log]
    assert shapes == [
        ("/openai/deployments/my-gpt/chat/completions", {"api-version": "2024-10-21"},
         ["api-key"], "DDDD", "my-gpt"),
        ("/openai/v1/chat/completions", {}, ["api-key"], "DDDD", "my-gpt"),
        ("/openai/deployments/other/chat/completions", {"api-version": "2025-04-01-preview"},
         ["api-key"], "DDDD", "other"),
    ]


def test_gemini_streaming_usage_on_every_chunk_is_counted_once(server: FakeLLMServer) -> None:
    prompt = "ECHO " + "word " * 40

    async def ask() -> tuple[str, Any, Any]:
        async with AsyncOpenAIClient(model="gemini/gemini-2.5-flash", api_key="g",
                                     base_url=server.root_url + "/v1beta/openai") as client:
            plain = await client.completion(prompt)
            once = client.usage
            pieces = [p async for p in client.completion_stream(prompt)]
            assert "".join(pieces) == plain
            return plain, once, client.usage

    _, once, twice = run_sync(ask())
    assert server.requests_log[-1]["path"] == "/v1beta/openai/chat/completions"
    assert server.stats()["streams"] == 1
    assert twice.prompt_tokens == 2 * once.prompt_tokens
    assert twice.completion_tokens == 2 * once.completion_tokens
    # Priced by the name without the provider prefix.
    assert twice.cost_usd > 0


def test_a_provider_without_a_batch_api_says_so() -> None:
    with pytest.raises(ConfigError, match="'gemini' provider has no Batch API"):
        wire_for(adapter_class("gemini")(None, "k"))


def test_anthropic_errors_keep_the_servers_words(server: FakeLLMServer) -> None:
    server.inject("500", 1, message="the upstream broke")

    async def ask() -> str:
        async with AsyncOpenAIClient(model=f"anthropic/{ROOT}", api_key="k",
                                     base_url=server.root_url, max_retries=0) as client:
            return await client.completion("ECHO x")

    with pytest.raises(LLMError, match="the upstream broke"):
        run_sync(ask())
