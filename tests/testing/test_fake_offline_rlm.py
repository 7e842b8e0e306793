"""The fake server's scripted RLM (``python -m rlm.testing``'s default): the ``rlm`` command
on a real file ends "final" in two turns with an answer grounded in the file, through
``rlm run``, ``rlm batch``, ``rlm serve`` and ``rlm mcp``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from mcp import Client, StdioServerParameters
from serve_support import rlm_server

from rlm import prompts
from rlm.testing import rlm_responder, spawn_fake_server
from rlm.testing.scripted import SUB_INSTRUCTION, extract_answer

README = Path(__file__).resolve().parents[2] / "README.md"
QUERY = "How do I install it with pip?"


@pytest.fixture(scope="module")
def fake_url() -> Iterator[str]:
    """``python -m rlm.testing`` with its defaults, in its own process."""
    with spawn_fake_server() as url:
        yield url


def rlm_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rlm.cli", *args],
        capture_output=True, text=True, timeout=240, cwd=cwd, stdin=subprocess.DEVNULL,
    )


def test_an_excerpt_is_answered_with_its_sentences_that_share_the_most_words() -> None:
    excerpt = (
        "The weather was mild. Install the package with pip install rlm-sandbox today. "
        "Nothing else matters here at all."
    )
    assert extract_answer(QUERY, excerpt) == (
        "Install the package with pip install rlm-sandbox today."
    )
    assert extract_answer("Which planets have rings?", excerpt) == "NOTHING RELEVANT"


def test_a_question_without_content_words_gets_the_excerpts_opening_sentences() -> None:
    excerpt = "# Title\n\nFirst real sentence of the text. Second one follows it. Third one."
    assert extract_answer("what is this?", excerpt) == (
        "First real sentence of the text. Second one follows it."
    )


def test_root_turns_get_code_that_fans_out_then_finishes() -> None:
    system = prompts.build_system_prompt(sub_window_chars=100_000, sub_model="m")
    first_user = prompts.FIRST_USER_TEMPLATE.format(description="a str", query=QUERY)
    history: list[dict[str, Any]] = [
        {"role": "system", "content": system},
        {"role": "user", "content": first_user},
    ]
    first = rlm_responder(history)
    assert "```repl" in first and "llm_query_batch(prompts)" in first and repr(QUERY) in first
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "ok"}]
    assert "FINAL(answer)" in rlm_responder(history)
    sub = f"{SUB_INSTRUCTION}\nQuestion: {QUERY}\n\nExcerpt 1 of 1:\nUse pip install x to get it."
    assert rlm_responder([{"role": "user", "content": sub}]) == "Use pip install x to get it."
    assert rlm_responder([{"role": "user", "content": "ECHO 7"}]) == "7"


def test_rlm_run_on_the_readme_ends_final_in_two_turns_with_a_grounded_answer(
    fake_url: str,
) -> None:
    done = rlm_cli("run", "--base-url", fake_url, "--api-key", "x", "--context", str(README),
                   "--query", QUERY, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["stopped_reason"] == "final"
    assert result["iterations"] == 2
    assert result["sub_calls"] >= 2
    assert "pip install rlm-sandbox" in result["answer"]


def test_rlm_batch_answers_every_task_from_its_own_file(fake_url: str, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("The meeting moved to Thursday. The budget for travel is 4,000 euros.\n")
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(
        json.dumps({"id": "readme", "query": QUERY, "context_path": str(README)}) + "\n"
        + json.dumps({"id": "notes", "query": "What is the travel budget?",
                      "context_path": str(notes)}) + "\n"
    )
    out = tmp_path / "out.jsonl"
    done = rlm_cli("batch", str(tasks), "--out", str(out), "--base-url", fake_url,
                   "--api-key", "x")
    assert done.returncode == 0, done.stderr
    results = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert {r["stopped_reason"] for r in results.values()} == {"final"}
    assert "pip install" in results["readme"]["answer"]
    assert "4,000 euros" in results["notes"]["answer"]


def test_rlm_serve_answers_the_openai_sdk_from_the_scripted_root(fake_url: str) -> None:
    with rlm_server(["serve", "--port", "0", "--base-url", fake_url, "--api-key", "x"],
                    ready=r"listening on (http://\S+/v1)") as url:
        with openai.OpenAI(base_url=url, api_key="none") as client:
            reply = client.chat.completions.create(
                model="rlm",
                messages=[{"role": "system", "content": README.read_text()},
                          {"role": "user", "content": QUERY}],
            )
    assert reply.choices[0].finish_reason == "stop"
    assert "pip install rlm-sandbox" in (reply.choices[0].message.content or "")


async def test_rlm_mcp_answers_rlm_query_from_the_scripted_root(fake_url: str) -> None:
    server = StdioServerParameters(
        command=sys.executable,
        args=["-m", "rlm.cli", "mcp", "--base-url", fake_url, "--api-key", "x"],
    )
    async with Client(server) as client:
        result = await client.call_tool(
            "rlm_query", {"query": QUERY, "context": README.read_text()}
        )
    assert not result.is_error
    data = result.structured_content
    assert data is not None
    assert data["stopped_reason"] == "final"
    assert "pip install rlm-sandbox" in data["answer"]
