"""Coroutines a cell makes and never awaits leave nothing on the host's stderr.

Every coroutine a cell gets (its own ``async def``'s, the llm_query family's, asyncio's,
``anext``'s, an async tool's) is made when first awaited, so one never awaited is never
made and Python has nothing to warn about when the namespace is cleared, when a failed
cell's traceback is dropped, or when a cell drops it at once.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest

from rlm import REPLEnv

# Run with every warning an error: an unawaited coroutine collected anywhere in the
# process would print "Exception ignored in: <coroutine ...>" on stderr.
HOST = textwrap.dedent(
    """
    import gc, sys, warnings
    warnings.simplefilter("error")
    from rlm import REPLEnv

    async def tool(x):
        return x

    env = REPLEnv(context="c", sandbox=sys.argv[1], timeout=10, tools={"lookup": tool})
    cells = [
        # kept in the namespace until it is cleared
        "import asyncio\\nasync def f():\\n    return 1\\n"
        "c = f()\\ng = asyncio.gather(f(), llm_query_async('x'))\\n"
        "s = asyncio.sleep(0)\\nw = asyncio.wait_for(f(), 1)",
        "async def ag():\\n    yield 1\\n"
        "held = [anext(ag()), lookup(1), llm_query_async('x'), llm_query_batch_async(['x'])]",
        # a temporary that a failing cell's traceback holds
        "getattr(f(), 'cr_frame')",
        "getattr(llm_query_async('x'), 'cr_frame')",
        # made and dropped at once
        "f()\\nllm_query_async('y')\\nasyncio.sleep(1)\\nlookup(2)",
    ]
    for code in cells:
        env.execute(code)
    env.close()
    gc.collect()
    print("done")
    """
)


@pytest.mark.parametrize("sandbox", ["local", "process"])
def test_unawaited_coroutines_leave_no_warning_on_the_hosts_stderr(sandbox: str) -> None:
    # In the process sandbox the worker's own stderr is the host's too.
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", HOST, sandbox],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "done\n"
    assert proc.stderr == ""


def run(env: REPLEnv, code: str) -> str:
    result = env.execute(code)
    assert result.error is None, result.error
    return result.stdout


def test_a_cells_coroutine_runs_when_awaited(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env()
    out = run(env, (
        "import asyncio\nasync def double(x):\n    await asyncio.sleep(0)\n    return 2 * x\n"
        "class Box:\n    async def get(self, n):\n        return await double(n)\n"
        "pending = double(4)\n"
        "print(await pending, await Box().get(1), await asyncio.gather(double(1), double(2)))\n"
        "async def main():\n    t = asyncio.create_task(double(5))\n    return await t\n"
        "print(asyncio.run(main()) if False else await main())"
    ))
    assert out == "8 2 [2, 4]\n10\n"


def test_a_cells_coroutine_can_be_awaited_once(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env()
    r = env.execute("async def one():\n    return 1\nc = one()\nprint(await c)\nawait c")
    assert r.stdout == "1\n"
    assert r.error is not None and "cannot reuse already awaited coroutine" in r.error


def test_a_wrong_call_of_a_cells_async_function_fails_at_the_call(
    make_env: Callable[..., REPLEnv],
) -> None:
    env = make_env()
    r = env.execute("async def one(a):\n    return a\nc = one(1, 2)\nprint('made')")
    assert r.error is not None and "TypeError" in r.error
    assert "made" not in r.stdout


def test_async_generators_stay_async_generators(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env()
    out = run(env, (
        "async def count(n):\n    for i in range(n):\n        yield i\n"
        "print([i async for i in count(3)], await anext(count(2)))"
    ))
    assert out == "[0, 1, 2] 0\n"
