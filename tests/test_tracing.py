"""OpenTelemetry traces of runs: the span tree, its attributes and token counts, content
only with the capture switch, the limits that keep a large batch readable, the OTLP
JSON export of a recorded trajectory, and what tracing costs when it is off.

Spans are read back with the OpenTelemetry SDK's in-memory exporter; runs go against
FakeLLMServer on loopback.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from rlm_support import ROOT, SUB, make_rlm, repl

from rlm import RLM
from rlm.errors import ConfigError
from rlm.testing import FakeLLMServer
from rlm.tracing import CAPTURE_ENV, SUBCALL_SPANS_PER_CELL, TRACING_ENV, replay
from rlm.trajectory import read_log
from rlm.trajectory_otlp import trajectory_otlp

PRICES = {ROOT: (1.0, 2.0), SUB: (0.5, 1.0)}
_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def _provider() -> None:
    # The global tracer provider can be set once per process: one for the whole module.
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    trace.set_tracer_provider(provider)


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """The in-memory exporter, emptied; no switch from the shell leaks in."""
    monkeypatch.delenv(CAPTURE_ENV, raising=False)
    monkeypatch.delenv(TRACING_ENV, raising=False)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def depth_two_root(messages: list[dict[str, Any]]) -> str:
    """The root asks two child RLMs; each child asks the sub-model twice, then answers."""
    first_turn = not any(m["role"] == "assistant" for m in messages)
    if "Carry out the request" in messages[1]["content"]:
        if first_turn:
            return repl("r = llm_query_batch(['ECHO alpha', 'ECHO beta'])\nprint(r)")
        return repl("FINAL('child: ' + '+'.join(r))")
    if first_turn:
        return repl("r = llm_query_batch(['question one', 'question two'])\nprint(r)")
    return repl("FINAL(' | '.join(r))")


def run_depth_two(closing: list[RLM], **kw: Any) -> Any:
    with FakeLLMServer(scripts={ROOT: [depth_two_root]}) as srv:
        rlm = make_rlm(srv, closing, max_depth=2, tracing=True, prices=PRICES, **kw)
        return rlm.completion(context="parent context", query="ask the children")


def tree(spans: list[ReadableSpan]) -> tuple[Any, ...]:
    """The spans as nested (name, children) with children in a fixed order, so two runs
    whose concurrent children finished in another order compare equal."""
    children: dict[Any, list[ReadableSpan]] = {}
    for span in spans:
        children.setdefault(span.parent.span_id if span.parent else None, []).append(span)

    def node(span: ReadableSpan) -> tuple[Any, ...]:
        kids = sorted(children.get(span.context.span_id, []), key=lambda s: s.start_time)
        return (span.name, tuple(sorted((node(k) for k in kids), key=repr))
                if span.name.startswith("execute_tool") else tuple(node(k) for k in kids))

    return tuple(node(s) for s in children.get(None, []))


def chat_spans(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    return [s for s in spans if s.attributes.get("gen_ai.operation.name") == "chat"]


CHILD = ("invoke_agent rlm", (
    ("chat root-model", ()),
    ("execute_tool repl", (("chat sub-model", ()), ("chat sub-model", ()))),
    ("chat root-model", ()),
    ("execute_tool repl", ()),
))
DEPTH_TWO_TREE = (("invoke_agent rlm", (
    ("chat root-model", ()),
    ("execute_tool repl", (CHILD, CHILD)),
    ("chat root-model", ()),
    ("execute_tool repl", ()),
)),)


def test_a_depth_two_run_yields_the_span_tree(closing: list[RLM], spans: InMemorySpanExporter) -> None:
    result = run_depth_two(closing)
    assert result.answer == "child: alpha+beta | child: alpha+beta"
    assert tree(list(spans.get_finished_spans())) == DEPTH_TWO_TREE


def test_span_token_counts_equal_the_result_usage(closing: list[RLM], spans: InMemorySpanExporter) -> None:
    result = run_depth_two(closing)
    chats = chat_spans(list(spans.get_finished_spans()))
    total = result.usage["root"] + result.usage["sub"]
    assert sum(s.attributes["gen_ai.usage.input_tokens"] for s in chats) == total.prompt_tokens
    assert sum(s.attributes["gen_ai.usage.output_tokens"] for s in chats) == total.completion_tokens
    assert sum(s.attributes["rlm.cost_usd"] for s in chats) == pytest.approx(total.cost_usd)


def test_root_turn_spans_carry_the_prompt_cache_reads(closing: list[RLM],
                                                      spans: InMemorySpanExporter) -> None:
    # A query long enough that the first prompt reaches the 1,024-token caching threshold.
    script = [repl(f"print({i})") for i in range(3)] + [repl("FINAL('done')")]
    with FakeLLMServer(scripts={ROOT: script}) as srv:
        result = make_rlm(srv, closing, tracing=True).completion(
            context="x", query="Read everything first. " * 200)
    turns = [s for s in spans.get_finished_spans() if s.name == f"chat {ROOT}"]
    reads = [s.attributes.get("gen_ai.usage.cache_read.input_tokens", 0) for s in turns]
    assert len(reads) == 4 and reads[0] == 0 and all(n > 0 for n in reads[1:])
    assert sum(reads) == result.usage["root"].cached_input_tokens


def test_chat_spans_carry_the_genai_attributes(closing: list[RLM], spans: InMemorySpanExporter) -> None:
    run_depth_two(closing)
    sub_call = next(s for s in spans.get_finished_spans() if s.name == "chat sub-model")
    attributes = sub_call.attributes
    assert sub_call.kind == trace.SpanKind.CLIENT
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "openai"
    assert attributes["gen_ai.request.model"] == SUB
    assert attributes["gen_ai.response.model"] == SUB  # as the server named it
    assert attributes["gen_ai.usage.input_tokens"] > 0 and attributes["gen_ai.usage.output_tokens"] > 0
    assert attributes["rlm.cost_usd"] > 0


def test_agent_and_tool_spans_carry_the_genai_attributes(closing: list[RLM], spans: InMemorySpanExporter) -> None:
    result = run_depth_two(closing)
    finished = list(spans.get_finished_spans())
    [top] = [s for s in finished if s.parent is None]
    assert top.attributes["gen_ai.operation.name"] == "invoke_agent"
    assert top.attributes["gen_ai.agent.name"] == "rlm"
    assert top.attributes["gen_ai.request.model"] == ROOT
    assert top.attributes["rlm.stopped_reason"] == "final"
    assert top.attributes["rlm.usage.input_tokens"] == (result.usage["root"] + result.usage["sub"]).prompt_tokens
    cell = next(s for s in finished if s.name == "execute_tool repl" and s.parent == top.context)
    assert cell.attributes["gen_ai.operation.name"] == "execute_tool"
    assert cell.attributes["gen_ai.tool.name"] == "repl"
    assert cell.attributes["rlm.duration_s"] > 0 and cell.attributes["rlm.sub_calls"] == 2


def test_a_failing_cell_is_an_error_span_with_its_type(closing: list[RLM], spans: InMemorySpanExporter) -> None:
    script = [repl("undefined_name"), repl("FINAL('done')")]
    with FakeLLMServer(scripts={ROOT: script}) as srv:
        make_rlm(srv, closing, tracing=True).completion(context="x", query="q")
    failed = [s for s in spans.get_finished_spans() if s.name == "execute_tool repl"][0]
    assert failed.status.status_code == trace.StatusCode.ERROR
    assert failed.attributes["error.type"] == "NameError"


def test_no_message_content_without_the_capture_switch(closing: list[RLM], spans: InMemorySpanExporter) -> None:
    run_depth_two(closing)
    values = json.dumps([dict(s.attributes) for s in spans.get_finished_spans()])
    for text in ("ECHO alpha", "question one", "llm_query_batch", "ask the children"):
        assert text not in values
    for key in ("gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions",
                "gen_ai.tool.call.arguments", "gen_ai.tool.call.result"):
        assert key not in values


def test_message_content_with_the_capture_switch(closing: list[RLM], spans: InMemorySpanExporter,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CAPTURE_ENV, "true")
    run_depth_two(closing)
    finished = list(spans.get_finished_spans())
    sub_call = next(s for s in finished if s.name == "chat sub-model")
    asked = json.loads(sub_call.attributes["gen_ai.input.messages"])
    answered = json.loads(sub_call.attributes["gen_ai.output.messages"])
    assert asked[0]["role"] == "user" and asked[0]["parts"][0]["content"] in ("ECHO alpha", "ECHO beta")
    assert answered[0]["parts"][0]["content"] == asked[0]["parts"][0]["content"].removeprefix("ECHO ")
    first_turn = next(s for s in finished if s.name == "chat root-model")
    assert "gen_ai.system_instructions" in first_turn.attributes
    cell = next(s for s in finished if s.name == "execute_tool repl")
    assert "llm_query_batch" in json.loads(cell.attributes["gen_ai.tool.call.arguments"])["code"]


@pytest.mark.timeout(900)  # 10,000 requests with the server in this process, on a loaded machine
def test_a_10000_item_batch_stays_within_the_span_limit(closing: list[RLM], spans: InMemorySpanExporter) -> None:
    code = "r = llm_query_batch([f'ECHO {i}' for i in range(10_000)])\nFINAL(str(len(r)))"
    with FakeLLMServer(scripts={ROOT: [repl(code)]}) as srv:
        result = make_rlm(srv, closing, tracing=True, prices=PRICES,
                          max_concurrency=256).completion(context="x", query="q")
    assert result.answer == "10000"
    finished = list(spans.get_finished_spans())
    assert len(finished) <= SUBCALL_SPANS_PER_CELL + 10
    cell = next(s for s in finished if s.name == "execute_tool repl")
    assert cell.attributes["rlm.subcalls.spans"] == SUBCALL_SPANS_PER_CELL
    assert cell.attributes["rlm.subcalls.summarised"] == 10_000 - SUBCALL_SPANS_PER_CELL
    assert cell.attributes["rlm.subcalls.latency_max_s"] >= cell.attributes["rlm.subcalls.latency_p50_s"]
    [aggregate] = [s for s in finished if s.attributes.get("rlm.aggregate")]
    assert aggregate.attributes["rlm.aggregate.calls"] == 10_000 - SUBCALL_SPANS_PER_CELL
    # Summed, not dropped: the trace's tokens still add up to the run's.
    total = result.usage["root"] + result.usage["sub"]
    chats = chat_spans(finished)
    assert sum(s.attributes["gen_ai.usage.input_tokens"] for s in chats) == total.prompt_tokens
    assert sum(s.attributes["gen_ai.usage.output_tokens"] for s in chats) == total.completion_tokens


def test_child_runs_past_the_limit_are_summed_into_their_cell(closing: list[RLM],
                                                              spans: InMemorySpanExporter) -> None:
    def root(messages: list[dict[str, Any]]) -> str:
        if "Carry out the request" in messages[1]["content"]:
            return repl("FINAL(llm_query('ECHO ' + context))")
        return repl("r = llm_query_batch([str(i) for i in range(120)])\nFINAL(str(len(r)))")

    with FakeLLMServer(scripts={ROOT: [root]}) as srv:
        result = make_rlm(srv, closing, max_depth=2, tracing=True).completion(context="x", query="q")
    assert result.answer == "120"
    finished = list(spans.get_finished_spans())
    children = [s for s in finished if s.name == "invoke_agent rlm" and s.parent is not None]
    assert len(children) == SUBCALL_SPANS_PER_CELL
    cell = next(s for s in finished if s.name == "execute_tool repl" and s.attributes["rlm.depth"] == 0)
    assert cell.attributes["rlm.subcalls.summarised"] == 20
    total = result.usage["root"] + result.usage["sub"]
    assert sum(s.attributes["gen_ai.usage.input_tokens"] for s in chat_spans(finished)) == total.prompt_tokens


def otlp_tree(document: dict[str, Any]) -> tuple[Any, ...]:
    """An OTLP JSON document's spans as ``tree`` gives them for the SDK's spans."""
    [resource] = document["resourceSpans"]
    [scope] = resource["scopeSpans"]
    items = scope["spans"]
    children: dict[str, list[dict[str, Any]]] = {}
    for span in items:
        children.setdefault(span.get("parentSpanId", ""), []).append(span)

    def node(span: dict[str, Any]) -> tuple[Any, ...]:
        kids = sorted(children.get(span["spanId"], []), key=lambda s: int(s["startTimeUnixNano"]))
        return (span["name"], tuple(sorted((node(k) for k in kids), key=repr))
                if span["name"].startswith("execute_tool") else tuple(node(k) for k in kids))

    return tuple(node(s) for s in children.get("", []))


def test_the_otlp_export_of_a_recorded_trajectory_has_the_same_spans(
        closing: list[RLM], spans: InMemorySpanExporter, tmp_path: Path) -> None:
    result = run_depth_two(closing, log_dir=tmp_path)
    document = trajectory_otlp(read_log(result.log_path))
    assert otlp_tree(document) == tree(list(spans.get_finished_spans())) == DEPTH_TWO_TREE
    live = sorted((s.name, s.start_time, s.end_time) for s in spans.get_finished_spans())
    items = document["resourceSpans"][0]["scopeSpans"][0]["spans"]
    exported = sorted((s["name"], int(s["startTimeUnixNano"]), int(s["endTimeUnixNano"])) for s in items)
    assert exported == live  # both are drawn from the trajectory's own times


def test_the_otlp_export_follows_the_protobuf_json_mapping(closing: list[RLM], tmp_path: Path,
                                                           spans: InMemorySpanExporter) -> None:
    result = run_depth_two(closing, log_dir=tmp_path)
    document = trajectory_otlp(read_log(result.log_path))
    resource = document["resourceSpans"][0]
    assert {"key": "service.name", "value": {"stringValue": "rlm"}} in resource["resource"]["attributes"]
    items = resource["scopeSpans"][0]["spans"]
    assert len({s["traceId"] for s in items}) == 1
    for span in items:
        assert len(span["traceId"]) == 32 and len(span["spanId"]) == 16
        int(span["traceId"], 16), int(span["spanId"], 16)
        assert span["startTimeUnixNano"].isdigit() and span["endTimeUnixNano"].isdigit()
        assert span["kind"] in (1, 3)
    sub_call = next(s for s in items if s["name"] == "chat sub-model")
    values = {a["key"]: a["value"] for a in sub_call["attributes"]}
    assert values["gen_ai.request.model"] == {"stringValue": SUB}
    assert list(values["gen_ai.usage.input_tokens"]) == ["intValue"]
    assert values["gen_ai.usage.input_tokens"]["intValue"].isdigit()
    assert list(values["rlm.cost_usd"]) == ["doubleValue"]
    assert trajectory_otlp(read_log(result.log_path)) == document  # stable ids


def test_the_environment_switch_turns_tracing_on(closing: list[RLM], spans: InMemorySpanExporter,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRACING_ENV, "1")
    with FakeLLMServer(scripts={ROOT: [repl("FINAL('ok')")]}) as srv:
        make_rlm(srv, closing).completion(context="x", query="q")
        assert [s.name for s in spans.get_finished_spans()][-1] == "invoke_agent rlm"
        spans.clear()
        make_rlm(srv, closing, tracing=False).completion(context="x", query="q")
    assert spans.get_finished_spans() == ()


def test_tracing_must_be_a_bool_or_none(closing: list[RLM]) -> None:
    with FakeLLMServer() as srv, pytest.raises(ConfigError, match="tracing must be True, False or None"):
        make_rlm(srv, closing, tracing="yes")


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in (TRACING_ENV, CAPTURE_ENV)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**environ, **env}, cwd=Path(__file__).parent)


def test_a_run_without_tracing_never_imports_opentelemetry() -> None:
    code = (
        "import sys\n"
        "from rlm_support import ROOT, make_rlm, repl\n"
        "from rlm.testing import FakeLLMServer\n"
        "with FakeLLMServer(scripts={ROOT: [repl('FINAL(llm_query(\"ECHO hi\"))')]}) as srv:\n"
        "    rlm = make_rlm(srv)\n"
        "    print(rlm.completion(context='x', query='q').answer)\n"
        "    rlm.close()\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["hi", "[]"]


def test_tracing_without_the_extra_says_how_to_install_it() -> None:
    code = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None  # as if opentelemetry-api were not installed\n"
        "from rlm_support import make_rlm\n"
        "from rlm.errors import ConfigError\n"
        "from rlm.testing import FakeLLMServer\n"
        "with FakeLLMServer() as srv:\n"
        "    try:\n"
        "        make_rlm(srv, tracing=None)\n"
        "        print('none: fine')\n"
        "        make_rlm(srv, tracing=True)\n"
        "    except ConfigError as exc:\n"
        "        print(exc)\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "none: fine",
        "tracing=True needs opentelemetry-api: pip install 'rlm-sandbox[otel]' (and an "
        "OpenTelemetry SDK to export the spans)",
    ]


def test_replay_sends_a_recorded_trajectory_as_the_live_spans(closing: list[RLM], tmp_path: Path,
                                                               spans: InMemorySpanExporter) -> None:
    result = run_depth_two(closing, log_dir=tmp_path)
    live = sorted((s.name, s.start_time, s.end_time) for s in spans.get_finished_spans())
    spans.clear()
    replay(read_log(result.log_path))
    replayed = list(spans.get_finished_spans())
    assert tree(replayed) == DEPTH_TWO_TREE
    assert sorted((s.name, s.start_time, s.end_time) for s in replayed) == live


def _rlm_run(srv: FakeLLMServer, tmp_path: Path, *flags: str, code: str = "",
             **env: str) -> subprocess.CompletedProcess[str]:
    context = tmp_path / "context.txt"
    context.write_text("some text", encoding="utf-8")
    argv = ["run", "--context", str(context), "--query", "q", "--base-url", srv.url, "--model", ROOT,
            "--recursive-model", SUB, "--api-key", "k", "--sandbox", "local", *flags]
    environ = {k: v for k, v in os.environ.items()
               if k not in (TRACING_ENV, CAPTURE_ENV) and not k.startswith("OTEL_")}
    script = f"import sys\n{code}\nfrom rlm.cli import main\nsys.exit(main({argv!r}))\n"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env={**environ, **env})


def test_rlm_run_trace_prints_the_spans_when_no_endpoint_is_set(tmp_path: Path) -> None:
    with FakeLLMServer(scripts={ROOT: [repl("FINAL(llm_query('ECHO ok'))")]}) as srv:
        proc = _rlm_run(srv, tmp_path, "--trace")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    names = re.findall(r'^    "name": "([^"]+)"', proc.stderr, re.MULTILINE)
    assert sorted(names) == ["chat root-model", "chat sub-model", "execute_tool repl", "invoke_agent rlm"]
    assert '"service.name": "rlm"' in proc.stderr


def test_rlm_run_trace_without_the_sdk_says_how_to_install_it(tmp_path: Path) -> None:
    with FakeLLMServer(scripts={ROOT: [repl("FINAL('ok')")]}) as srv:
        proc = _rlm_run(srv, tmp_path, "--trace", code="sys.modules['opentelemetry.sdk'] = None")
    assert proc.returncode == 2 and proc.stdout == ""
    [line] = proc.stderr.strip().splitlines()
    assert "--trace needs an OpenTelemetry SDK" in line and "pip install opentelemetry-sdk" in line
