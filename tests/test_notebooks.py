"""The notebooks, executed headless on a real Jupyter kernel, and rlm under a kernel's
interrupt.

Each notebook starts its own FakeLLMServer, so it runs offline; the tests assert on what
its cells print and display (answers, peak in-flight counts, the progress bar's final
state, failures). The kernel runs this interpreter through a kernelspec written to a
scratch directory, so a fresh machine with only the venv behaves like a developer's.
The interrupt tests drive a kernel with jupyter_client against servers in this
process, whose counters show whether the interrupted requests really stopped.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ipykernel.kernelspec
import nbformat
import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager, start_new_kernel
from nbclient import NotebookClient
from rlm_support import wait_until

from rlm.testing import FakeLLMServer

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = (
    "01_quickstart.ipynb", "02_long_context.ipynb", "03_many_rlms.ipynb", "04_typed_answers.ipynb",
)
KERNEL = "rlm-test-python"


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A kernelspec that runs this very interpreter, found through JUPYTER_PATH."""
    prefix = tmp_path_factory.mktemp("jupyter")
    ipykernel.kernelspec.install(kernel_name=KERNEL, prefix=str(prefix))
    mp = pytest.MonkeyPatch()
    mp.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    # Kernels inherit this environment: no real key or endpoint may leak into a run,
    # and IPython's history goes to a scratch directory.
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "RLM_MODEL"):
        mp.delenv(name, raising=False)
    mp.setenv("IPYTHONDIR", str(prefix / "ipython"))
    mp.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    yield KERNEL
    mp.undo()


@pytest.fixture(scope="module")
def executed(kernel_name: str) -> Callable[[str], Any]:
    """Execute a notebook once per test module (cached) and return it with its outputs."""
    cache: dict[str, Any] = {}

    def run(name: str) -> Any:
        if name not in cache:
            nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
            client = NotebookClient(
                nb, kernel_name=kernel_name, timeout=180, startup_timeout=120,
                resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
            )
            client.execute()  # raises CellExecutionError on the first failing cell
            cache[name] = nb
        return cache[name]

    return run


def cell(nb: Any, cell_id: str) -> Any:
    for c in nb.cells:
        if c.get("id") == cell_id:
            return c
    raise AssertionError(f"no cell with id {cell_id!r}")


def text(nb: Any, cell_id: str) -> str:
    """Everything a code cell printed or showed as plain text."""
    parts = []
    for out in cell(nb, cell_id).outputs:
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("display_data", "execute_result"):
            parts.append(out.data.get("text/plain", ""))
        elif out.output_type == "error":
            parts.append(f"{out.ename}: {out.evalue}")
    return "".join(parts)


def html(nb: Any, cell_id: str) -> str:
    return "".join(
        out.data.get("text/html", "")
        for out in cell(nb, cell_id).outputs
        if out.output_type in ("display_data", "execute_result")
    )


# -- the committed notebooks ---------------------------------------------------------------


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_committed_notebook_holds_the_outputs_of_a_full_run(name: str) -> None:
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "run top to bottom"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    silent = {"server", "cleanup"}  # cells that only set things up or tear them down
    assert [c.id for c in code if not c.outputs and c.id not in silent] == []


def test_the_committed_long_context_notebook_shows_its_plot() -> None:
    nb = nbformat.read(NOTEBOOK_DIR / "02_long_context.ipynb", as_version=4)
    assert any("image/png" in o.get("data", {}) for o in cell(nb, "plot").outputs)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_notebook_points_at_real_servers_in_prose(name: str) -> None:
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    prose = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert 'RLM(model="gpt-4o", recursive_model="gpt-4o-mini")' in prose
    assert "OPENAI_API_KEY" in prose
    assert "localhost:8000/v1" in prose  # vLLM
    assert "11434/v1" in prose  # Ollama


# -- 01 quickstart -------------------------------------------------------------------------


def test_quickstart_client_answers_one_prompt_and_a_batch(executed: Callable[[str], Any]) -> None:
    nb = executed("01_quickstart.ipynb")
    out = text(nb, "client")
    assert out.startswith("negative\n")
    assert "10 replies in" in out
    assert re.search(r"negative  review 0009 \(\w[\w -]*\): stopped working on day two", out)
    assert "usage so far: 11 calls" in out


def test_quickstart_repl_cell_fans_out_and_renders_as_html(executed: Callable[[str], Any]) -> None:
    nb = executed("01_quickstart.ipynb")
    assert "sub_calls=6" in text(nb, "repl")
    page = html(nb, "repl")
    assert "6 sub-calls" in page
    assert "negative  review 0009" in page
    assert "ZeroDivisionError: division by zero" in html(nb, "repl-error")


def test_quickstart_rlm_answers_sync_async_and_through_the_magic(executed: Callable[[str], Any]) -> None:
    nb = executed("01_quickstart.ipynb")
    truth = re.search(r"truth: (\d+ of 2000 reviews are negative)", text(nb, "data")).group(1)
    assert f"RLMResult(answer='{truth}'" in text(nb, "rlm-sync")
    assert truth in html(nb, "rlm-sync")
    assert "correct:  True" in text(nb, "rlm-check")
    assert text(nb, "rlm-async").startswith(f"{truth} | 3 iterations, 10 sub-queries")
    assert "2,000 lines" in text(nb, "root-view")  # a description, not the reviews
    assert "review 1999" not in text(nb, "root-view")
    config = text(nb, "magic-config")
    assert "model=scripted-root" in config and "api_key=***" in config
    assert "offline-key" not in config
    assert f"RLMResult(answer='{truth}'" in text(nb, "magic-run")
    assert text(nb, "magic-check") == f"{truth} | correct: True\n"


# -- 02 long context -----------------------------------------------------------------------


def test_long_context_sequential_holds_one_request_and_concurrent_all_of_them(
    executed: Callable[[str], Any],
) -> None:
    nb = executed("02_long_context.ipynb")
    assert "200,000 lines" in text(nb, "document")
    assert "40 chunks of 5,000 lines" in text(nb, "chunk")
    assert re.search(r"sequential: 40 requests, peak in flight 1, [\d.]+ s; counts match: True", text(nb, "sequential"))
    # Concurrent: (nearly) all 40 in flight at once. On a loaded machine the first
    # replies (0.2 s) can land before the last request is sent, so 30 is the floor: a
    # sequential loop would show 1.
    found = re.search(r"concurrent: 40 requests, peak in flight (\d+), [\d.]+ s; counts match: True",
                      text(nb, "concurrent"))
    assert found and int(found.group(1)) >= 30
    found = re.search(r"REPL cell: 40 sub-queries, peak in flight (\d+), [\d.]+ s; counts match: True",
                      text(nb, "repl"))
    assert found and int(found.group(1)) >= 30


def test_long_context_shows_a_table_and_a_plot(executed: Callable[[str], Any]) -> None:
    nb = executed("02_long_context.ipynb")
    table = text(nb, "table")
    for strategy in ("sequential (one await after another)", "concurrent (client.completion_batch)",
                     "concurrent, from REPL code (llm_query_batch)"):
        assert strategy in table
        assert strategy in html(nb, "table")
    assert re.search(r"sequential \(one await after another\)\s+1\s", table)
    found = re.search(r"concurrent \(client\.completion_batch\)\s+(\d+)\s", table)
    assert found and int(found.group(1)) >= 30
    assert any("image/png" in o.get("data", {}) for o in cell(nb, "plot").outputs)


def test_long_context_rlm_run_gets_the_exact_counts(executed: Callable[[str], Any]) -> None:
    nb = executed("02_long_context.ipynb")
    out = text(nb, "rlm-check")
    answer = re.search(r"answer: +(.*)", out).group(1)
    assert re.search(r"expected: +(.*)", out).group(1) == answer
    assert re.fullmatch(r"billing \d+, shipping \d+, login \d+, bug \d+", answer)
    check = re.search(r"correct: (\w+); (\d+) sub-queries, peak in flight (\d+)", out)
    assert check.group(1, 2) == ("True", "40")
    # The 40 sub-queries went out together (a loaded machine may start the last few
    # after the first came back, so not exactly 40; sequential would be 1).
    assert int(check.group(3)) >= 20
    assert answer in html(nb, "rlm")


# -- 03 many RLMs ----------------------------------------------------------------------------


def test_many_rlms_progress_ends_at_20_of_20_with_the_failures_counted(
    executed: Callable[[str], Any],
) -> None:
    nb = executed("03_many_rlms.ipynb")
    bars = [o for o in cell(nb, "batch").outputs if o.output_type == "display_data"]
    assert len(bars) == 1, "the progress bar is one output updated in place"
    assert re.match(r"tasks 20/20 · 2 failed · ", bars[0].data["text/plain"])
    assert '<progress value="20" max="20"' in bars[0].data["text/html"]


def test_many_rlms_failures_are_per_task(executed: Callable[[str], Any]) -> None:
    nb = executed("03_many_rlms.ipynb")
    assert "18 answered (18 correct), 2 failed" in text(nb, "results")
    table = text(nb, "results")
    assert len(re.findall(r"^node-\d\d .* yes ", table, re.MULTILINE)) == 18
    failures = text(nb, "failures").splitlines()
    assert [line.split(":")[0] for line in failures] == ["node-07", "node-13"]
    assert all("stopped_reason='error'" in line and "503" in line for line in failures)


def test_many_rlms_retry_and_gather(executed: Callable[[str], Any]) -> None:
    nb = executed("03_many_rlms.ipynb")
    assert text(nb, "retry").startswith("20 answered (20 correct), 0 failed")
    out = text(nb, "gather")
    assert "(6 sub-queries" in out and "(30 sub-queries" in out
    assert "both correct: True" in out


# -- 04 typed answers ------------------------------------------------------------------------


def test_typed_answers_run_gives_a_validated_report_after_one_fix(executed: Callable[[str], Any]) -> None:
    nb = executed("04_typed_answers.ipynb")
    truth = re.search(r"truth: (\d+) late orders", text(nb, "data")).group(1)
    check = text(nb, "check")
    assert check.startswith(f"Report | {truth} late orders |")
    assert "correct: True" in check
    assert "4 iterations, 12 structured sub-queries" in check
    feedback = text(nb, "feedback")
    assert "answer_invalid: [{'path': '$.total_late_orders'" in feedback
    assert "does not match the required JSON Schema" in feedback
    assert "stopped_reason='final'" in text(nb, "run")


def test_typed_answers_sub_queries_use_response_format_or_fall_back(executed: Callable[[str], Any]) -> None:
    nb = executed("04_typed_answers.ipynb")
    truth = re.search(r"truth: (\d+) late orders", text(nb, "data")).group(1)
    assert re.match(r"\[\d+, \d+, \d+\] dict\njson_schema \| schema sent: \{'type': 'object'", text(nb, "subquery"))
    assert text(nb, "fallback") == f"6 chunks, {truth} late orders\n7 requests; refused: 1 (the first)\n"


def test_typed_answers_other_schemas_the_failure_and_the_magic(executed: Callable[[str], Any]) -> None:
    nb = executed("04_typed_answers.ipynb")
    assert text(nb, "dict-schema").startswith("True {")
    invalid = text(nb, "invalid")
    assert invalid.startswith("invalid_answer | output: None | raw: {'total_late_orders': 'many'}")
    assert "$.total_late_orders: expected a valid integer" in invalid
    truth = re.search(r"truth: (\d+) late orders", text(nb, "data")).group(1)
    assert text(nb, "magic-check") == f"Report {truth} True\n"


# -- a kernel interrupt ----------------------------------------------------------------------

ROOT_SCRIPT = [
    "```repl\nreplies = llm_query_batch(['ECHO a', 'ECHO b', 'ECHO c'])\n```",
    "```repl\nFINAL(' '.join(replies))\n```",
]
# Longer than the test waits: only a cancellation can end these requests in time.
SLOW_S = 300.0


class Kernel:
    """A kernel driven cell by cell, as a notebook front end does."""

    def __init__(self, km: KernelManager, kc: BlockingKernelClient) -> None:
        self.km, self.kc = km, kc

    def start(self, code: str) -> str:
        return self.kc.execute(code)

    def reply(self, msg_id: str, timeout: float = 60) -> dict[str, Any]:
        while True:
            msg = self.kc.get_shell_msg(timeout=timeout)
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg["content"]

    def run(self, code: str) -> dict[str, Any]:
        content = self.reply(self.start(code))
        assert content["status"] == "ok", f"{content.get('ename')}: {content.get('evalue')}"
        return content

    def value(self, expression: str) -> str:
        """Evaluate ``expression`` in the kernel and return its repr."""
        for _ in range(50):
            content = self.reply(self.kc.execute("", user_expressions={"v": expression}))
            # Right after a cell fails, the kernel aborts requests that reach it before
            # it has finished with the failure, as a front end's queued cells would be.
            if content["status"] != "aborted":
                break
            time.sleep(0.1)
        assert content["status"] == "ok", content
        result = content["user_expressions"]["v"]
        assert result["status"] == "ok", result
        return result["data"]["text/plain"]


@pytest.fixture
def slow() -> Iterator[FakeLLMServer]:
    """Scripted root and echoing sub-model, every request taking SLOW_S."""
    with FakeLLMServer(scripts={"root": ROOT_SCRIPT}, latency=SLOW_S) as srv:
        yield srv


@pytest.fixture
def fast() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(scripts={"root": ROOT_SCRIPT}) as srv:
        yield srv


@pytest.fixture
def kernel(kernel_name: str, fast: FakeLLMServer, slow: FakeLLMServer) -> Iterator[Kernel]:
    """A kernel with ``rlm_sub`` (slow sub-queries) and ``rlm_root`` (slow root turns)."""
    km, kc = start_new_kernel(kernel_name=kernel_name, startup_timeout=120)
    k = Kernel(km, kc)
    k.run(f"""
import asyncio
from rlm import RLM, AsyncOpenAIClient
rlm_sub = RLM(model="root", recursive_model="sub",
              client=AsyncOpenAIClient(model="root", base_url={fast.url!r}, api_key="k"),
              sub_client=AsyncOpenAIClient(model="sub", base_url={slow.url!r}, api_key="k"))
rlm_root = RLM(model="root", recursive_model="sub", base_url={slow.url!r}, api_key="k")
""")
    try:
        yield k
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


@pytest.mark.parametrize(
    ("code", "in_flight", "raised"),
    [
        ("r = rlm_sub.completion('ctx', 'q')", 3, "RunInterrupted"),  # a KeyboardInterrupt
        ("r = await rlm_sub.acompletion('ctx', 'q')", 3, "CancelledError"),
        ("r = await rlm_root.acompletion('ctx', 'q')", 1, "CancelledError"),
        ("r = await asyncio.gather(rlm_sub.acompletion('a', 'q'), rlm_root.acompletion('b', 'q'))",
         4, "CancelledError"),
    ],
    ids=["sync-completion", "await-during-a-cell", "await-during-a-root-turn", "gather"],
)
def test_interrupting_the_kernel_cancels_the_requests_in_flight(
    kernel: Kernel, slow: FakeLLMServer, code: str, in_flight: int, raised: str
) -> None:
    msg_id = kernel.start(code)
    assert wait_until(lambda: slow.in_flight == in_flight), slow.stats()
    kernel.km.interrupt_kernel()
    content = kernel.reply(msg_id)
    assert (content["status"], content["ename"]) == ("error", raised)
    # Well before the requests' own 300 s: they were cancelled, not waited out.
    assert wait_until(lambda: slow.in_flight == 0), f"requests still running: {slow.stats()}"
    assert slow.requests == in_flight
    assert kernel.value("1 + 1") == "2"
    slow.latency = 0
    assert kernel.value("rlm_sub.completion('ctx', 'q').answer") == "'a b c'"
