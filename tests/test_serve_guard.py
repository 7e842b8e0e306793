"""``rlm serve`` against web pages and hostile schemas, as a real subprocess over real HTTP.

A web page can reach a loopback server: a "simple" cross-origin POST needs no preflight,
and DNS rebinding lets the page read the answers. The server answers only requests whose
Host names it (421), whose Origin is an allowed host (403) and whose POST body is declared
application/json (415). Schema checks run in validation threads: a slow one leaves the
server answering.
"""

from __future__ import annotations

import http.client
import json
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from serve_support import NEEDLE, QUERY, ROOT, SUB, rlm_server, sub_model

from rlm.errors import ConfigError
from rlm.serve.auth import HostRule, is_json_content_type
from rlm.testing import FakeLLMServer

BIG_ROOT = "root-big"
SLOW_ITEMS = {"type": "array", "items": {"allOf": [{"type": "integer"}] * 300}}
DOUBLING = {"type": ["array", "integer"], "items": {"allOf": [{"$ref": "#"}, {"$ref": "#"}]}}
READY = r"listening on (http://\S+/v1)"


def big_answer_script() -> list[str]:
    # A long list first (its check runs out of time), a short one after the feedback.
    return ["Listing.\n```repl\nFINAL(list(range(200_000)))\n```", "Again.\n```repl\nFINAL([1])\n```"]


@pytest.fixture(scope="module")
def guarded_upstream() -> Iterator[FakeLLMServer]:
    from serve_support import scripts

    with FakeLLMServer(sub_model, scripts={**scripts(), BIG_ROOT: big_answer_script()}) as srv:
        yield srv


def serve_args(upstream: FakeLLMServer, allowed: Path, *extra: str) -> list[str]:
    return ["serve", "--port", "0", "--base-url", upstream.url, "--api-key", "upstream-key",
            "--model", ROOT, "--recursive-model", SUB, "--allow-dir", str(allowed),
            "--sandbox", "local", "--no-cache", *extra]


@pytest.fixture(scope="module")
def url(guarded_upstream: FakeLLMServer, allowed: Path) -> Iterator[str]:
    with rlm_server(serve_args(guarded_upstream, allowed), ready=READY) as base:
        yield base


def raw(base: str, method: str, path: str, headers: dict[str, str], body: bytes | None = None) -> tuple[int, Any]:
    """One request with exactly these headers (a Host given here replaces the real one)."""
    parts = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None
    finally:
        conn.close()


def port_of(base: str) -> int:
    return urllib.parse.urlsplit(base).port or 0


def chat_body(**rlm: Any) -> bytes:
    body = {"model": "rlm", "messages": [{"role": "user", "content": QUERY}], "rlm": rlm}
    return json.dumps(body).encode()


def test_the_rebinding_reproduction_gets_421_and_reads_nothing(url: str, guarded_upstream: FakeLLMServer) -> None:
    before = guarded_upstream.requests
    host = f"rebind.attacker.example:{port_of(url)}"
    status, body = raw(url, "POST", "/v1/chat/completions",
                       {"Host": host, "Origin": f"http://{host}", "Content-Type": "text/plain"},
                       chat_body(context_path="log.txt"))
    assert status == 421
    assert NEEDLE not in json.dumps(body)
    assert guarded_upstream.requests == before


def test_a_rebound_host_cannot_read_the_model_list_either(url: str) -> None:
    status, _ = raw(url, "GET", "/v1/models", {"Host": "rebind.attacker.example"})
    assert status == 421


def test_a_rebound_host_gets_421_even_with_a_json_body(url: str) -> None:
    status, _ = raw(url, "POST", "/v1/chat/completions",
                    {"Host": f"evil.example:{port_of(url)}", "Content-Type": "application/json"},
                    chat_body(context_path="log.txt"))
    assert status == 421


@pytest.mark.parametrize("origin", ["http://evil.example", "https://attacker.example:8000", "null",
                                    "file://", "http://localhost.evil.example"])
def test_a_foreign_origin_gets_403(url: str, origin: str) -> None:
    status, body = raw(url, "POST", "/v1/chat/completions",
                       {"Origin": origin, "Content-Type": "application/json"}, chat_body())
    assert status == 403
    assert body["error"]["code"] == "origin_not_allowed"


@pytest.mark.parametrize("content_type", [
    "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x", "application/jsonp", None,
])
def test_a_post_not_declared_as_json_gets_415(url: str, guarded_upstream: FakeLLMServer,
                                              content_type: str | None) -> None:
    before = guarded_upstream.requests
    headers = {"Content-Type": content_type} if content_type else {}
    status, body = raw(url, "POST", "/v1/chat/completions", headers, chat_body(context_path="log.txt"))
    assert status == 415
    assert "application/json" in body["error"]["message"]
    assert guarded_upstream.requests == before


def test_a_page_served_from_loopback_is_answered(url: str) -> None:
    port = port_of(url)
    status, body = raw(url, "GET", "/v1/models", {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"})
    assert status == 200
    assert body["data"][0]["id"] == "rlm"


def test_the_openai_sdk_still_gets_answers(url: str) -> None:
    with openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60) as client:
        reply = client.chat.completions.create(
            model="rlm", messages=[{"role": "user", "content": QUERY}],
            extra_body={"rlm": {"context_path": "log.txt"}})
    assert reply.choices[0].message.content == NEEDLE


def test_an_allowed_host_flag_admits_that_host_and_its_pages(guarded_upstream: FakeLLMServer,
                                                             allowed: Path) -> None:
    args = serve_args(guarded_upstream, allowed, "--allowed-host", "rlm.internal")
    with rlm_server(args, ready=READY) as base:
        assert raw(base, "GET", "/v1/models", {"Host": "rlm.internal:8080",
                                                "Origin": "https://rlm.internal"})[0] == 200
        assert raw(base, "GET", "/v1/models", {"Host": "other.internal"})[0] == 421


def test_the_doubling_schema_is_refused_before_it_runs(url: str) -> None:
    with openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60) as client:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="rlm", messages=[{"role": "user", "content": QUERY}],
                                           extra_body={"rlm": {"schema": DOUBLING}})
    assert "exponential time" in info.value.message


def test_a_slow_typed_answer_check_leaves_the_server_answering(url: str) -> None:
    """While the root's long FINAL list is checked (until its 5 s budget runs out), the
    model list keeps being served; the run then gets the short list."""
    checking = threading.Event()
    stop = threading.Event()
    served = [0]

    def poll_models() -> None:
        while not stop.is_set():
            checking.wait()
            if stop.is_set():
                return
            status, _ = raw(url, "GET", "/v1/models", {})
            if checking.is_set() and status == 200:
                served[0] += 1

    poller = threading.Thread(target=poll_models)
    poller.start()
    events: list[str] = []
    answer = ""
    try:
        parts = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=120)
        body = json.dumps({"model": f"rlm:{BIG_ROOT}", "stream": True, "messages": [
            {"role": "user", "content": "List the numbers."}], "rlm": {"schema": SLOW_ITEMS}})
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        for line in response:
            text = line.decode().strip()
            if not text.startswith("data: {"):
                continue
            chunk = json.loads(text[6:])
            event = (chunk.get("rlm") or {}).get("event")
            if event:
                events.append(event)
                # The check runs between the cell's result and the next root turn.
                if event == "cell_result" and len(events) <= 4:
                    checking.set()
                elif checking.is_set():
                    checking.clear()
            for choice in chunk.get("choices") or []:
                answer += (choice.get("delta") or {}).get("content") or ""
        conn.close()
    finally:
        stop.set()
        checking.set()
        poller.join(60)
    assert json.loads(answer) == [1]
    # A check on the server's loop would have let at most one request through meanwhile.
    assert served[0] >= 3, events


def test_host_rule_reads_ipv6_ports_and_refuses_a_malformed_flag() -> None:
    rule = HostRule("::1", ["api.example:9000"])
    assert rule.allows_host("[::1]:8000")
    assert rule.allows_host("api.example:9000")
    assert not rule.allows_host("api.example:9001")
    assert not rule.allows_host("user@localhost")
    assert not rule.allows_host(None)
    assert HostRule("0.0.0.0").allows_host("127.0.0.1:1") and not HostRule("0.0.0.0").allows_host("0.0.0.0")
    assert HostRule("0.0.0.0", ["*"]).allows_host("anything.example")
    with pytest.raises(ConfigError, match="--allowed-host"):
        HostRule("127.0.0.1", ["http://x/y"])


def test_only_application_json_counts_as_json() -> None:
    assert is_json_content_type("application/json; charset=utf-8")
    assert is_json_content_type("Application/JSON")
    assert not is_json_content_type("application/json-patch+json")
    assert not is_json_content_type(None)
