"""`rlm bench`: generated tasks, scorers, and runs against FakeLLMServer end to end.

Generators are checked against a reference solver (tests/bench_support.py) that reads
only the context and the query, so every task is shown to be answerable exactly. The
runs start the real `rlm` command against a FakeLLMServer whose root model solves bench
tasks in the sandbox and whose direct call solves the whole prompt, so every score is
1 unless the harness itself loses something.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bench_support import ROOT, SUB, bench_server, solve
from browser_support import dump_dom, screenshot

from rlm import prompts
from rlm.bench.generators import FAMILIES, generate, parse_length
from rlm.bench.runner import write_reports
from rlm.bench.scorers import (
    extract_answer,
    oolong_score,
    pairs_f1,
    score,
    set_f1,
    string_match_all,
    string_match_any,
)
from rlm.errors import ConfigError
from rlm.jobs import load_tasks
from rlm.testing import FakeLLMServer

# -- generators ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_each_generator_gives_the_same_tasks_for_the_same_seed(family: str) -> None:
    first = [t.to_json() for t in generate(family, "2k", 2, seed=7)]
    again = [t.to_json() for t in generate(family, "2k", 2, seed=7)]
    other = [t.to_json() for t in generate(family, "2k", 2, seed=8)]
    assert first == again
    assert [t["context"] for t in first] != [t["context"] for t in other]


def test_each_generator_is_deterministic_across_processes() -> None:
    code = ("import hashlib, json; from rlm.bench.generators import FAMILIES, generate; "
            "print(hashlib.sha256(json.dumps([t.to_json() for f in FAMILIES "
            "for t in generate(f, '1k', 2, seed=3)]).encode()).hexdigest())")
    digests = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout
        for seed in (1, 2)
    }
    assert len(digests) == 1


@pytest.mark.parametrize("length", ["1k", "8k", "32k", "128k"])
@pytest.mark.parametrize("family", FAMILIES)
def test_each_generator_hits_its_length_within_ten_percent(family: str, length: str) -> None:
    target = parse_length(length) * 4
    for task in generate(family, length, 2, seed=1):
        assert abs(len(task.context) - target) <= 0.10 * target, (task.id, len(task.context))


@pytest.mark.parametrize("length", ["1k", "8k", "32k"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_reference_solver_solves_every_generated_task(family: str, length: str) -> None:
    for seed in (0, 1, 2):
        for task in generate(family, length, 3, seed=seed):
            assert solve(task.context, task.query) == task.expected, task.id


def test_niah_puts_its_needle_at_depths_that_vary_by_seed() -> None:
    depths = set()
    for seed in range(8):
        task = next(generate("niah", "4k", 1, seed=seed))
        depths.add(round(task.context.index("special magic") / len(task.context), 1))
    assert len(depths) >= 4


def test_lengths_are_read_in_binary_thousands_and_millions() -> None:
    assert [parse_length(x) for x in ("8k", "32K", "1m", "5000")] == [8192, 32768, 1048576, 5000]


@pytest.mark.parametrize("bad", ["", "8x", "k", "100", "99m"])
def test_a_bad_length_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_length(bad)


def test_an_unknown_task_family_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown task 'needle'"):
        next(generate("needle", "8k"))


# -- scorers -----------------------------------------------------------------------------


def test_string_match_all_counts_the_fraction_of_expected_strings_found() -> None:
    assert string_match_all(["111", "222", "333", "444"], "It is 111 and 333.") == 0.5
    assert string_match_all("1234567", "the number is 1234567") == 1.0
    assert string_match_all(["ABCDE"], "abcde") == 1.0


def test_string_match_any_is_one_when_any_expected_string_is_found() -> None:
    assert string_match_any(["paris", "lyon"], "It is Lyon.") == 1.0
    assert string_match_any(["paris", "lyon"], "It is Nice.") == 0.0


def test_oolong_score_gives_three_quarters_per_unit_off_for_numbers() -> None:
    assert oolong_score(10, "Answer: 10") == 1.0
    assert oolong_score(10, "Answer: 12") == pytest.approx(0.5625)
    assert oolong_score(10, "There are 7 of them") == pytest.approx(0.75**3)
    assert oolong_score(10, "Answer: none") == 0.0


def test_oolong_score_matches_labels_exactly_after_the_answer_tag() -> None:
    assert oolong_score("human being", "Label: **Human Being**") == 1.0
    assert oolong_score("human being", "Answer: human being.") == 1.0
    assert oolong_score("human being", "Answer: human") == 0.0


def test_extract_answer_takes_what_follows_the_last_answer_tag() -> None:
    assert extract_answer("I counted.\nAnswer: [42]") == "42"
    assert extract_answer("location") == "location"


def test_set_f1_is_the_harmonic_mean_of_precision_and_recall() -> None:
    assert set_f1({"a", "b", "c", "d"}, {"a", "b", "x"}) == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert set_f1(set(), set()) == 1.0
    assert set_f1({"a"}, set()) == 0.0


def test_pairs_f1_reads_pairs_in_any_order_and_format() -> None:
    expected = ["(11111, 22222)", "(11111, 33333)", "(22222, 33333)"]
    assert pairs_f1(expected, "(22222, 11111)\n11111, 33333\n(22222,33333)") == 1.0
    assert pairs_f1(expected, "(11111, 22222)") == pytest.approx(0.5)


def test_a_missing_answer_scores_zero_with_every_scorer() -> None:
    assert [score(f, "1", None) for f in ("niah", "oolong", "pairs")] == [0.0, 0.0, 0.0]


# -- rlm bench run, end to end --------------------------------------------------------


@pytest.fixture
def srv() -> Iterator[FakeLLMServer]:
    with bench_server() as server:
        yield server


def bench(srv: FakeLLMServer, out: Path, *args: str, env: dict[str, str] | None = None,
          ) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "rlm", "bench", "run", "--out", str(out), "--model", ROOT,
           "--recursive-model", SUB, "--base-url", srv.url, "--api-key", "k", "--sandbox",
           "local", *args]
    environ = {k: v for k, v in os.environ.items() if k != "RLM_BENCH_RLMS_PYTHON"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**environ, **(env or {})})


def results(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


SMALL = ("--tasks", "niah,oolong", "--lengths", "1k,2k", "--n", "2")


def test_bench_run_writes_results_summary_report_and_a_table(srv: FakeLLMServer,
                                                             tmp_path: Path) -> None:
    proc = bench(srv, tmp_path / "out", *SMALL, "--methods", "rlm,direct")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    lines = results(out)
    assert len(lines) == 2 * 2 * 2 * 2  # tasks x lengths x seeds x methods
    assert {(r["task"], r["length"], r["method"]) for r in lines} == {
        (t, n, m) for t in ("niah", "oolong") for n in ("1k", "2k") for m in ("rlm", "direct")}
    assert all(r["score"] == 1.0 and r["error"] is None for r in lines)
    for key in ("task", "length", "method", "id", "expected", "answer", "score", "cost_usd",
                "tokens", "wall_s", "error"):
        assert all(key in r for r in lines), key
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["rows"]) == 8 and all(row["score"] == 1.0 for row in summary["rows"])
    assert "<table" in (out / "report.html").read_text()
    assert len(load_tasks(out / "tasks.jsonl")) == 8
    assert "oolong" in proc.stdout and "direct" in proc.stdout  # the table


def test_bench_run_fans_out_sub_queries_for_the_rlm_method(srv: FakeLLMServer,
                                                          tmp_path: Path) -> None:
    proc = bench(srv, tmp_path / "out", "--tasks", "oolong", "--lengths", "8k", "--n", "1",
                 "--methods", "rlm")
    assert proc.returncode == 0, proc.stderr
    (line,) = results(tmp_path / "out")
    assert line["score"] == 1.0 and line["sub_calls"] >= 2


def test_a_rerun_resumes_without_asking_the_model_again(srv: FakeLLMServer,
                                                      tmp_path: Path) -> None:
    first = bench(srv, tmp_path / "out", *SMALL, "--methods", "rlm,direct")
    assert first.returncode == 0, first.stderr
    asked = srv.requests
    again = bench(srv, tmp_path / "out", *SMALL, "--methods", "rlm,direct")
    assert again.returncode == 0, again.stderr
    assert srv.requests == asked
    assert len(results(tmp_path / "out")) == 16
    assert "16 already done" in again.stderr


def test_the_cost_cap_stops_the_run_and_holds(srv: FakeLLMServer, tmp_path: Path) -> None:
    # $10 per million tokens each way: a cell over a 1k-token context costs about $0.01,
    # so a $0.10 cap lets about half of the 16 cells through, one at a time.
    prices = ("--price", f"{ROOT}=10,10", "--price", f"{SUB}=10,10")
    proc = bench(srv, tmp_path / "out", *SMALL, "--methods", "rlm,direct", *prices,
                 "--max-cost-usd", "0.1", "--concurrency", "1")
    assert proc.returncode == 1, proc.stderr
    assert "stopped: job max_cost_usd=0.1" in proc.stderr
    lines = results(tmp_path / "out")
    assert 0 < len(lines) < 16
    spent = sum(r["cost_usd"] for r in lines)
    largest = max(r["cost_usd"] for r in lines)
    assert spent <= 0.1 + largest


def test_the_rlms_method_is_skipped_with_one_clear_line_when_absent(srv: FakeLLMServer,
                                                                   tmp_path: Path) -> None:
    proc = bench(srv, tmp_path / "out", "--tasks", "niah", "--lengths", "1k", "--n", "1",
                 "--methods", "rlm,rlms")
    assert proc.returncode == 0, proc.stderr
    skipped = [line for line in proc.stderr.splitlines() if "rlms skipped" in line]
    assert len(skipped) == 1
    assert "the official rlms package is not installed" in skipped[0]
    assert "--rlms-python" in skipped[0]
    assert [r["method"] for r in results(tmp_path / "out")] == ["rlm"]


def test_a_direct_call_past_the_window_is_over_window_and_scores_zero(
        srv: FakeLLMServer, tmp_path: Path) -> None:
    proc = bench(srv, tmp_path / "out", "--tasks", "niah", "--lengths", "8k", "--n", "1",
                 "--methods", "direct", "--window-tokens", "6000")
    assert proc.returncode == 0, proc.stderr
    (line,) = results(tmp_path / "out")
    assert line["over_window"] is True and line["score"] == 0.0 and line["answer"] is None
    assert srv.requests == 0


def test_the_paper_prompt_is_the_root_system_prompt(srv: FakeLLMServer, tmp_path: Path) -> None:
    proc = bench(srv, tmp_path / "out", "--tasks", "niah", "--lengths", "1k", "--n", "1",
                 "--methods", "rlm", "--prompt", "paper")
    assert proc.returncode == 0, proc.stderr
    systems = {m["content"] for r in srv.requests_log if r["model"] == ROOT
               for m in r["messages"] if m["role"] == "system"}
    assert systems == {prompts.paper_system_prompt(500_000)}
    assert results(tmp_path / "out")[0]["score"] == 1.0


def test_bench_score_grades_edited_results_again(srv: FakeLLMServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert bench(srv, out, "--tasks", "niah", "--lengths", "1k", "--n", "2",
                 "--methods", "direct").returncode == 0
    lines = results(out)
    lines[0]["answer"] = "no idea"
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    proc = subprocess.run([sys.executable, "-m", "rlm", "bench", "score", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [r["score"] for r in results(out)] == [0.0, 1.0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"][0]["score"] == 0.5


def test_bench_generate_writes_tasks_that_rlm_batch_reads(tmp_path: Path) -> None:
    path = tmp_path / "tasks.jsonl"
    proc = subprocess.run([sys.executable, "-m", "rlm", "bench", "generate", "--task", "cwe",
                           "--length", "2k", "--n", "3", "--seed", "4", "--out", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [t.id for t in load_tasks(path)] == [line["id"] for line in lines]
    assert lines[0]["expected"] == next(generate("cwe", "2k", 1, seed=4)).expected
    assert {"id", "query", "context", "expected", "task", "length"} <= set(lines[0])


def test_an_unknown_method_is_a_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "rlm", "bench", "run", "--out", str(tmp_path),
                           "--methods", "rlm,magic", "--api-key", "k"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown method 'magic'" in proc.stderr


def _records_for_report() -> list[dict[str, Any]]:
    rows = []
    for length, tokens in (("8k", 8192), ("32k", 32768), ("128k", 131072)):
        for method, good in (("rlm", 1.0), ("direct", 0.5)):
            rows.append({"id": f"oolong-{length}-{method}", "task": "oolong", "length": length,
                         "length_tokens": tokens, "method": method, "score": good,
                         "cost_usd": 0.01 * tokens / 8192, "tokens": tokens, "wall_s": 1.0,
                         "error": None, "answer": "x", "expected": "x"})
    return rows


def test_the_html_report_opens_in_headless_chromium(tmp_path: Path) -> None:
    (tmp_path / "results.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in _records_for_report()))
    write_reports(tmp_path, {"model": "m"})
    dom = dump_dom(tmp_path / "report.html")
    assert '<table id="summary">' in dom and "<svg" in dom
    assert dom.count("<tr") == 1 + 6  # the header and one row per (length, method)
    png = screenshot(tmp_path / "report.html", tmp_path / "report.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
