"""The methods ``rlm bench`` compares, each answering one task: ``rlm``, ``direct``, ``rlms``.

This module holds how one task is answered one way and what that cost, as an
``RLMResult`` for every method: this project's RLM answers with its own; one direct
call with the whole context in the prompt is refused as "over window" when it cannot
fit (scored 0, as the RLM paper does); and the official ``rlms`` package runs in an
interpreter of its own, because it installs a top-level ``rlm`` package of the same
name as this one. It must not hold scoring, cell bookkeeping or output files
(``rlm.bench.runner`` has those).

Model calls spend from the job ledger of the block they run in (``rlm.usage.
spending_from``); a call that ledger refuses ends the task with ``stopped_reason
"budget"``, as an RLM run stopped by a job cap does.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from rlm.core import RLMResult
from rlm.errors import BudgetExhaustedError, LLMError
from rlm.jobs.tasks import Task
from rlm.usage import BudgetLedger, ModelUsage, Usage, outer_budget

__all__ = [
    "DEFAULT_WINDOW_TOKENS",
    "METHODS",
    "direct_prompt",
    "find_rlms",
    "run_direct",
    "run_rlms",
    "window_tokens",
]

METHODS = ("rlm", "direct", "rlms")

# Context windows in tokens by model-name prefix (longest prefix wins), from the
# providers' model pages; OOLONG's evaluation code uses 272k for GPT-5 as well.
WINDOWS: dict[str, int] = {
    "gpt-5": 272_000,
    "gpt-4.1": 1_047_576,
    "gpt-4o": 128_000,
    "o3": 200_000,
    "o4-mini": 200_000,
    "claude": 200_000,
    "gemini": 1_048_576,
}
DEFAULT_WINDOW_TOKENS = 128_000
# Tokens kept free for the reply when deciding whether a direct prompt fits.
REPLY_RESERVE_TOKENS = 4_096
RLMS_TIMEOUT_S = 3_600.0
RLMS_PYTHON_ENV = "RLM_BENCH_RLMS_PYTHON"


def window_tokens(model: str) -> int:
    """The context window of ``model`` in tokens (by known name prefix; else 128k)."""
    name = model.rsplit("/", 1)[-1].lower()
    best = max((p for p in WINDOWS if name.startswith(p)), key=len, default=None)
    return WINDOWS[best] if best is not None else DEFAULT_WINDOW_TOKENS


def direct_prompt(context: Any, query: str) -> str:
    """The one user message of the direct method: the whole context, then the query."""
    text = context if isinstance(context, str) else json.dumps(context, ensure_ascii=False)
    return f"{text}\n\n{query}"


def _usage(model: str, calls: int, prompt_tokens: int, completion_tokens: int, cost: float,
           priced: bool) -> Usage:
    total = prompt_tokens + completion_tokens
    per_model = ModelUsage(calls, prompt_tokens, completion_tokens, total, cost, priced)
    return Usage(calls, prompt_tokens, completion_tokens, total, cost, by_model={model: per_model})


async def run_direct(client: Any, context: Any, query: str, window: int) -> RLMResult:
    """Answer ``query`` with one call of ``client``'s model given the whole ``context``.

    A prompt estimated (characters / 4) above ``window`` minus a reply reserve is not
    sent: the result has ``stopped_reason="over_window"``, no answer and no cost.
    """
    started = time.monotonic()
    prompt = direct_prompt(context, query)
    estimate = len(prompt) // 4
    if estimate + REPLY_RESERVE_TOKENS > window:
        return RLMResult(None, stopped_reason="over_window",
                         error=f"over window: about {estimate:,} prompt tokens for a "
                               f"{window:,}-token window")
    meter = client.new_meter()
    job = outer_budget()
    # The call is priced with the client's table and counted in the job's ledger.
    spend = None if job is None else BudgetLedger(prices=client.prices, parent=job)
    answer: str | None = None
    error, stopped = None, "final"
    try:
        answer = await client.send(client.request(prompt), meter=meter, ledger=spend)
    except BudgetExhaustedError as exc:
        error, stopped = str(exc), "budget"
    except LLMError as exc:
        error, stopped = str(exc) or type(exc).__name__, "error"
    return RLMResult(answer, iterations=1, elapsed_s=time.monotonic() - started,
                     usage={"root": meter.snapshot(), "sub": Usage()}, stopped_reason=stopped,
                     error=error)


_DRIVER = Path(__file__).with_name("rlms_driver.py")


def find_rlms(python: str | None = None) -> tuple[str | None, str]:
    """The interpreter that has the official ``rlms`` package, and a line saying why not.

    ``python`` (else $RLM_BENCH_RLMS_PYTHON) names it: ``rlms`` installs a top-level
    ``rlm`` package that would shadow this one, so it lives in a virtualenv of its own.
    Returns ``(path, "rlms X.Y.Z")`` when it imports there, ``(None, reason)`` if not.
    """
    python = python or os.environ.get(RLMS_PYTHON_ENV)
    how = (f"install it in a virtualenv of its own (python -m venv rlms-env && "
           f"rlms-env/bin/pip install rlms) and pass --rlms-python rlms-env/bin/python or set "
           f"{RLMS_PYTHON_ENV}, because it installs a top-level `rlm` package that would "
           "shadow this one")
    if not python:
        return None, f"the official rlms package is not installed; {how}"
    check = ("import importlib.metadata as m; from rlm import RLM; "
             "print(m.version('rlms'))")
    try:
        # -I: neither the current directory nor PYTHONPATH, so `rlm` is theirs.
        proc = subprocess.run([python, "-I", "-c", check], capture_output=True, text=True,
                              timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{python} cannot run ({exc}); {how}"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"{python} has no usable rlms package ({last}); {how}"
    return python, f"rlms {proc.stdout.strip()}"


async def run_rlms(python: str, task: Task, settings: dict[str, Any],
                   prices: Any) -> RLMResult:
    """Answer ``task`` with the official ``rlms`` package run by ``python``.

    ``settings`` holds ``model``, ``recursive_model``, ``base_url``, ``api_key`` and
    ``max_iterations``; ``prices(model)`` gives the model's ``Price`` or
    None. The cost is priced here from the token counts the package reports (its calls
    cannot draw from the job's ledger, so a cost cap binds between its tasks only).
    """
    started = time.monotonic()
    spec = dict(settings)
    api_key = spec.pop("api_key", None)
    if task.line_ref is not None:
        spec["tasks_file"], spec["offset"] = task.line_ref
    else:
        spec["context"] = await asyncio.to_thread(task.load_context)
    spec["query"] = task.query
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if api_key:
        env["OPENAI_API_KEY"] = api_key
    proc = await asyncio.create_subprocess_exec(
        python, "-I", str(_DRIVER), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(json.dumps(spec).encode()),
                                          RLMS_TIMEOUT_S)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    lines = [line for line in out.decode(errors="replace").splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " ".join(err.decode(errors="replace").split())[-300:] or f"exit {proc.returncode}"
        return RLMResult(None, stopped_reason="error", error=f"rlms: {tail}",
                         elapsed_s=time.monotonic() - started)
    data = json.loads(lines[-1])
    usage = Usage()
    for model, use in (data.get("usage") or {}).items():
        tin, tout = int(use.get("input_tokens") or 0), int(use.get("output_tokens") or 0)
        price = prices(model)
        cost = price.list_cost(tin, tout) if price is not None else 0.0
        calls = int(use.get("calls") or 0)
        usage = usage + _usage(model, calls, tin, tout, cost, price is not None)
    answer = data.get("answer")
    return RLMResult(answer, usage={"root": usage, "sub": Usage()},
                     stopped_reason="final" if answer is not None else "error",
                     error=data.get("error"), elapsed_s=time.monotonic() - started)
