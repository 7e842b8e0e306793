"""Code real root models write (replayed from public trajectories), in every sandbox.

Each idiom below was refused by the policy before; each must now run, and still hand
nothing of the host to the code (no module, loop, task internals or frames).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest

from rlm import REPLEnv

CSV_TEXT = "id,name,amount\n1,Ada,10\n2,Bob,32\n3,Cy,5\n"


def run(env: REPLEnv, code: str) -> str:
    result = env.execute(code)
    assert result.error is None, result.error
    return result.stdout


def test_csv_reader_over_io_stringio(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env(context=CSV_TEXT)
    out = run(env, "import csv, io\nrows = list(csv.DictReader(io.StringIO(context)))\n"
                   "print(sum(int(r['amount']) for r in rows), rows[1]['name'])")
    assert out == "47 Bob\n"


def test_io_bytesio_round_trip(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env()
    assert run(env, "import io\nb = io.BytesIO()\nb.write(b'abc')\nprint(b.getvalue())") == "b'abc'\n"


def test_io_holds_only_the_in_memory_files(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env()
    for name in ("open", "FileIO", "open_code", "TextIOWrapper"):
        result = env.execute(f"import io\nio.{name}")
        assert result.error is not None and "has no attribute" in result.error


def test_sys_facade_has_maxsize_version_info_and_getsizeof_only(
    make_env: Callable[..., REPLEnv],
) -> None:
    env = make_env()
    out = run(env, "import sys\nprint(sys.maxsize, tuple(sys.version_info[:2]), sys.getsizeof(1) > 0)")
    assert out == f"{sys.maxsize} {tuple(sys.version_info[:2])} True\n"
    for name in ("modules", "exit", "_getframe", "settrace", "stdout", "path"):
        result = env.execute(f"import sys\nsys.{name}")
        assert result.error is not None, name


def test_csv_field_size_limit_with_sys_maxsize(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env(context="a,b\n" + "x" * 200_000 + ",2\n")
    out = run(env, "import csv, io, sys\nold = csv.field_size_limit(sys.maxsize)\n"
                   "rows = list(csv.reader(io.StringIO(context)))\n"
                   "print(old, len(rows[1][0]), csv.field_size_limit())")
    assert out == f"131072 200000 {sys.maxsize}\n"


def test_csv_field_size_limit_is_per_env(make_env: Callable[..., REPLEnv]) -> None:
    first, second = make_env(), make_env()
    run(first, "import csv\ncsv.field_size_limit(10_000_000)")
    assert run(second, "import csv\nprint(csv.field_size_limit())") == "131072\n"


def test_hasattr_tells_the_truth_about_protocol_dunders(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env(context="some text")
    out = run(env, "print(hasattr(context, '__len__'), hasattr(context, '__iter__'), "
                   "hasattr(context, '__contains__'), hasattr(context, '__getitem__'), "
                   "hasattr(5, '__len__'))\n"
                   "print(getattr(context, '__len__')(), len.__name__, type(context).__name__)")
    assert out == "True True True True False\n9 len str\n"


def test_protocol_dunders_lead_no_further(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env()
    for code in (
        "getattr(context, '__len__').__self__",
        "getattr(context.__len__, '__objclass__')",
        "getattr(getattr(context, '__getitem__'), '__self__')",
        "class A:\n    def __len__(self):\n        return 1\ngetattr(A().__len__, '__func__')",
        "class B:\n    def __len__(self):\n        return 1\ngetattr(B().__len__, '__globals__')",
    ):
        result = env.execute(code)
        assert result.error is not None, code
        assert "not accessible" in result.error or "off limits" in result.error, code


def test_asyncio_gather_over_llm_query_async(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env()
    out = run(env, "import asyncio\n"
                   "results = await asyncio.gather(*[llm_query_async(f'ECHO {i}') for i in range(5)])\n"
                   "print(results)")
    assert out == "['0', '1', '2', '3', '4']\n"


def test_asyncio_run_of_a_main_coroutine_in_a_plain_cell(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env()
    out = run(env, "import asyncio\n"
                   "async def main():\n"
                   "    sem = asyncio.Semaphore(2)\n"
                   "    async def one(i):\n"
                   "        async with sem:\n"
                   "            return await llm_query_async(f'ECHO {i}')\n"
                   "    return await asyncio.gather(*(one(i) for i in range(4)))\n"
                   "print(asyncio.run(main()))")
    assert out == "['0', '1', '2', '3']\n"


def test_asyncio_tasks_queue_wait_for_and_as_completed(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env()
    out = run(env, "import asyncio\n"
                   "q = asyncio.Queue()\n"
                   "async def producer():\n"
                   "    for i in range(3):\n"
                   "        await q.put(i)\n"
                   "t = asyncio.create_task(producer())\n"
                   "await t\n"
                   "print(t.done(), [q.get_nowait() for _ in range(3)])\n"
                   "try:\n"
                   "    await asyncio.wait_for(asyncio.sleep(5), 0.05)\n"
                   "except asyncio.TimeoutError:\n"
                   "    print('timed out')\n"
                   "async def late(i, d):\n"
                   "    await asyncio.sleep(d)\n"
                   "    return i\n"
                   "order = [await f for f in asyncio.as_completed([late(1, 0.2), late(2, 0.0)])]\n"
                   "print(order)")
    assert out == "True [0, 1, 2]\ntimed out\n[2, 1]\n"


def test_asyncio_tasks_do_not_outlive_their_cell(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env()
    run(env, "import asyncio\nticks = []\n"
             "async def forever():\n"
             "    while True:\n"
             "        ticks.append(1)\n"
             "        await asyncio.sleep(0.01)\n"
             "t = asyncio.create_task(forever())\n"
             "await asyncio.sleep(0.05)")
    seen = run(env, "print(t.done(), t.cancelled())\nn = len(ticks)")
    assert seen == "True True\n"
    assert run(env, "await asyncio.sleep(0.05)\nprint(len(ticks) == n)") == "True\n"


def test_asyncio_facade_hands_out_no_loop_or_task_internals(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env()
    run(env, "import asyncio\nasync def f():\n    return 1\nt = asyncio.create_task(f())\nawait t")
    for code in (
        "t._task",
        "t.get_loop()",
        "asyncio.get_event_loop()",
        "asyncio.get_running_loop()",
        "asyncio.events",
        "asyncio.subprocess",
        "asyncio.Queue()._get_loop()",
        "type(t)._task",
    ):
        result = env.execute(code)
        assert result.error is not None, code


def test_asyncio_create_task_outside_a_loop_says_how(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env()
    result = env.execute("import asyncio\nasync def f():\n    return 1\nasyncio.create_task(f())")
    assert result.error is not None and "top-level await" in result.error


def test_final_var_given_a_value_finishes_with_it(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env()
    result = env.execute("answer = 'The total is 47.'\nFINAL_VAR(answer)")
    assert result.error is None
    assert result.final == "The total is 47."
    assert "taken as FINAL(value)" in result.stderr


def test_final_var_given_a_number_finishes_with_it(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env()
    assert env.execute("FINAL_VAR(47)").final == 47


def test_final_var_with_an_unknown_name_still_says_so(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env()
    result = env.execute("FINAL_VAR('anwser')")
    assert result.final is None
    assert result.error is not None and "no variable named 'anwser'" in result.error


@pytest.mark.parametrize("module", ["micropip", "os", "subprocess", "scipy"])
def test_other_imports_are_refused_with_the_list(make_env: Callable[..., REPLEnv], module: str) -> None:
    env = make_env()
    result = env.execute(f"import {module}")
    assert result.error is not None and "Allowed modules:" in result.error and "io" in result.error


def test_final_var_given_a_one_word_value_held_by_a_variable(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env()
    result = env.execute("best = 'north'\nFINAL_VAR(best)")
    assert result.final == "north"
    assert "taken as FINAL(value)" in result.stderr


def test_lowering_the_csv_limit_in_a_repl_leaves_the_host_and_others_alone(
    make_env: Callable[..., REPLEnv],
) -> None:
    import csv

    host_before = csv.field_size_limit()
    env, other = make_env(context="a\n" + "y" * 500 + "\n"), make_env(context="a\n" + "y" * 500 + "\n")
    run(env, "import csv\ncsv.field_size_limit(1)")
    assert csv.field_size_limit() == host_before
    out = run(other, "import csv, io\nprint(len(list(csv.reader(io.StringIO(context)))[1][0]))")
    assert out == "500\n"


# -- files and data libraries: only where the OS layer holds them ----------------------

DATA_CELL = (
    "import io, numpy as np, pandas as pd, yaml\n"
    "df = pd.read_csv(io.StringIO(context))\n"
    "print(int(df['amount'].sum()), float(np.mean(df['amount'])), yaml.safe_load('k: [1, 2]'))\n"
    "with open('scratch.txt', 'w') as f:\n"
    "    f.write('kept')\n"
    "print(open('scratch.txt').read())"
)


def test_open_and_data_libraries_follow_the_os_layer(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env(context=CSV_TEXT, timeout=30.0)
    protections = env.protections
    result = env.execute(DATA_CELL)
    confined = (
        protections["filesystem_jail"] and protections["network_namespace"]
        and protections["capabilities_dropped"]
    )
    assert protections["file_access"] == confined
    if confined:
        assert protections["data_modules"] == "numpy, pandas, yaml"
        assert result.error is None, result.error
        assert result.stdout == "47 15.666666666666666 {'k': [1, 2]}\nkept\n"
    else:
        assert protections["data_modules"] == ""
        assert result.error is not None
        assert "sandbox='process' with its filesystem jail" in result.error


def test_open_in_a_confined_worker_stays_in_its_private_root(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env(timeout=30.0)
    if not env.protections["file_access"]:
        result = env.execute("open('x.txt', 'w')")
        assert result.error is not None and "no file access here" in result.error
        return
    # The jail's root is the private directory: the host's files are not there.
    for code in ("open('/etc/passwd').read()", "open('../../etc/hostname').read()",
                 "open('/proc/self/environ').read()"):
        result = env.execute(code)
        assert result.error is not None and ("FileNotFoundError" in result.error
                                             or "PermissionError" in result.error), code

