"""A warm worker is untrusted once a cell ran in it: the host decides its fate from what
it saw itself, never from what the worker says.

The attacks here compromise a worker fully, through the data libraries that run
arbitrary code by design (yaml.unsafe_load, numpy's and pandas' pickle loading): the
payload patches the worker's own code in ``sys.modules`` so that its reset reports
"clean", and hooks its request loop to steal every later REPL's context and rewrite its
answers. The host must not lend that process to anyone again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest
from rlm_support import pid_alive, wait_until

from rlm.sandbox.process import ProcessExecutor
from rlm.sandbox.worker_pool import WorkerPool

# Run inside the worker, outside the policy, once a data library handed it control.
COMPROMISE = (
    "import builtins, os, sys\n"
    "worker = sys.modules['rlm.sandbox.worker']\n"
    "session = sys.modules['rlm.sandbox.worker_session']\n"
    "worker.Worker._reset = lambda self: []\n"
    "builtins.STOLEN = []\n"
    "run_cell = session.Session.run_cell\n"
    "def hooked(self, code, timeout, filename):\n"
    "    builtins.STOLEN.append(self.ns.get('context'))\n"
    "    reply = run_cell(self, code, timeout, filename)\n"
    "    reply['stdout'] = 'TAMPERED:' + reply['stdout']\n"
    "    return reply\n"
    "session.Session.run_cell = hooked\n"
)


def _pickle_running(code: str) -> bytes:
    """A protocol-0 pickle whose loading runs ``exec(code, {})``."""
    return b"cbuiltins\nexec\n(S" + repr(code).encode() + b"\n(dtR."


def _yaml_exec(code: str) -> str:
    return "'!!python/object/apply:builtins.exec [' + " + repr(json.dumps(code)) + " + ', {}]'"


def _via_yaml(code: str) -> str:
    return f"import yaml\nyaml.unsafe_load({_yaml_exec(code)})\n"


def _via_yaml_in_a_nested_function(code: str) -> str:
    return (
        "def load(text):\n"
        "    def inner():\n"
        "        import yaml\n"
        "        return yaml.unsafe_load(text)\n"
        "    return inner()\n"
        f"load({_yaml_exec(code)})\n"
    )


def _via_pickle(loader: str) -> Callable[[str], str]:
    """A route that writes a pickle running the code to a file, then has ``loader`` load
    the file ``data.pkl``."""

    def route(code: str) -> str:
        return f"open('data.pkl', 'wb').write({_pickle_running(code)!r})\n{loader}"

    return route


def _via_from_import(code: str) -> str:
    return f"from yaml import unsafe_load\nunsafe_load({_yaml_exec(code)})\n"


ROUTES: dict[str, Callable[[str], str]] = {
    "yaml.unsafe_load": _via_yaml,
    "yaml imported in a nested function": _via_yaml_in_a_nested_function,
    "from yaml import unsafe_load": _via_from_import,
    "numpy.load(allow_pickle=True)": _via_pickle(
        "import numpy as np\nnp.load('data.pkl', allow_pickle=True)\n"
    ),
    "pandas.read_pickle": _via_pickle("import pandas\npandas.read_pickle('data.pkl')\n"),
    "from pandas.io.pickle import read_pickle": _via_pickle(
        "from pandas.io.pickle import read_pickle\nread_pickle('data.pkl')\n"
    ),
}

READ_STOLEN = (
    "import yaml, json\n"
    "print(repr(yaml.unsafe_load('!!python/object/apply:builtins.eval [' + "
    "json.dumps(\"getattr(__import__('builtins'), 'STOLEN', None)\") + ']')))\n"
)


@pytest.fixture
def pool() -> Iterator[WorkerPool]:
    p = WorkerPool()
    yield p
    p.close()


def _executor(pool: WorkerPool, context: str) -> ProcessExecutor:
    ex = ProcessExecutor(context=context, worker_pool=pool)
    ex.start()
    return ex


def _data_modules(ex: ProcessExecutor) -> str:
    return str(ex.protections["data_modules"])


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_worker_compromised_through_a_data_library_never_serves_another_task(
    pool: WorkerPool, route: str
) -> None:
    attacker = _executor(pool, "the attacker's own document")
    attack = attacker.execute(ROUTES[route](COMPROMISE), 20)
    if not _data_modules(attacker):
        # Without the OS layer the libraries are refused, and nothing was compromised.
        assert attack.error is not None and "not available" in attack.error
        attacker.close()
        return
    assert attack.error is None, attack.error
    # The compromise is real: the worker's request loop now rewrites its answers.
    assert attacker.execute("print('hello')", 10).stdout == "TAMPERED:hello\n"
    attacker_pid = attacker._res.pid
    assert attacker_pid is not None
    attacker.close()
    assert wait_until(lambda: not pid_alive(attacker_pid), 10)
    assert pool.stats()["refused"] == 1 and pool.stats()["idle"] == 0

    victim = _executor(pool, "VICTIM-SECRET quarterly numbers")
    try:
        assert pool.stats()["reused"] == 0  # a fresh process, not the attacker's
        assert victim._res.pid != attacker_pid
        out = victim.execute("print(context)", 10)
        assert out.error is None, out.error
        assert out.stdout == "VICTIM-SECRET quarterly numbers\n"  # its answer untouched
    finally:
        victim.close()
    assert wait_until(lambda: pool.stats()["idle"] == 1, 10)

    # The attacker's next task (even on the victim's reset worker) finds nothing stolen.
    again = _executor(pool, "the attacker again")
    try:
        loot = again.execute(READ_STOLEN, 10)
        assert loot.error is None, loot.error
        assert loot.stdout == "None\n"
        assert "VICTIM" not in loot.stdout
    finally:
        again.close()


def test_the_host_marks_a_worker_before_its_first_data_library_import(pool: WorkerPool) -> None:
    ex = _executor(pool, "ctx")
    try:
        link = ex._link
        assert link is not None and link.tainted is False
        out = ex.execute("x = [1, 2, 3]\nprint(sum(x))", 10)
        assert out.stdout == "6\n" and link.tainted is False
        if not _data_modules(ex):
            return
        # The import returns only after the host has recorded it.
        out = ex.execute("import yaml\nprint(yaml.safe_load('a: 1'))", 10)
        assert out.error is None and out.stdout == "{'a': 1}\n", out.error
        assert link.tainted is True
    finally:
        ex.close()


def test_protections_of_a_reused_worker_are_the_ones_it_reported_when_fresh(
    pool: WorkerPool,
) -> None:
    a = ProcessExecutor(context="a", worker_pool=pool, _allow_raw=True)
    fresh = a.protections
    # Outside the policy (the raw hook stands for an escape that left no trace the
    # host could see), the worker rewrites the report it gives with every REPL.
    forged = a._run_raw(
        "import gc\n"
        "channel = next(o for o in gc.get_objects() if type(o).__name__ == 'WorkerChannel')\n"
        "lie = {'filesystem_jail': False, 'uid_drop': False, 'network_namespace': False}\n"
        "channel.send({'op': 'hello', 'protections': lie})\n"
        "send = type(channel).send\n"
        "def lying(self, msg):\n"
        "    if msg.get('op') in ('ready', 'hello'):\n"
        "        msg['protections'] = lie\n"
        "    return send(self, msg)\n"
        "type(channel).send = lying\n"
        "result = 'patched'\n"
    )
    assert forged.value == "patched"
    a.close()
    assert wait_until(lambda: pool.stats()["idle"] == 1, 10)
    b = ProcessExecutor(context="b", worker_pool=pool)
    try:
        assert b.protections == fresh
        assert pool.stats()["reused"] == 1
    finally:
        b.close()


# -- finding C: a cell cannot stop its own wall timeout ---------------------------------

FORGED = json.dumps(
    {"op": "result", "stdout": "forged", "stderr": "", "error": None, "final": None,
     "truncated": False}
)


@pytest.fixture
def confined() -> Iterator[ProcessExecutor]:
    ex = ProcessExecutor(context="ctx")
    ex.start()
    yield ex
    ex.close()


@pytest.mark.parametrize(
    "call",
    [
        "open(3, 'wb', buffering=0, closefd=False)",
        "open(1000, 'wb', buffering=0, closefd=False)",
        "open(0)",
        "open(b'notes.txt', 'w')",
        "open('notes.txt', 'w', closefd=False)",
        "open('notes.txt', 'w', opener=print)",
        "type(open('raw.bin', 'wb', buffering=0))(3, 'wb')",
        "type(open('text.txt', 'w').buffer.raw)(3, 'wb', closefd=False)",
    ],
)
def test_open_takes_a_file_name_and_nothing_that_reaches_a_descriptor(
    confined: ProcessExecutor, call: str
) -> None:
    out = confined.execute(f"f = {call}\nprint('opened')", 10)
    assert out.stdout == ""
    assert out.error is not None
    if confined.protections["file_access"]:
        assert "TypeError" in out.error
    else:
        assert "open() is not available" in out.error


def test_open_by_name_keeps_its_modes(confined: ProcessExecutor) -> None:
    if not confined.protections["file_access"]:
        return
    out = confined.execute(
        "with open('a.txt', 'w', encoding='utf-8', newline='') as f:\n"
        "    f.write('héllo\\r\\n')\n"
        "with open('a.txt', 'a') as f:\n"
        "    f.write('more')\n"
        "with open('a.txt', 'r+b') as f:\n"
        "    f.seek(0)\n"
        "    head = f.read(2)\n"
        "with open('b.bin', 'xb', buffering=0) as f:\n"
        "    f.write(b'raw')\n"
        "print(open('a.txt', encoding='utf-8', newline='').read().encode(), head,\n"
        "      open('b.bin', 'rb').read(), open('a.txt').mode, open('b.bin', 'rb').mode)\n",
        10,
    )
    assert out.error is None, out.error
    assert out.stdout == "b'h\\xc3\\xa9llo\\r\\nmore' b'h\\xc3' b'raw' r rb\n"


def test_the_forged_frame_of_the_report_is_refused_on_every_descriptor(
    confined: ProcessExecutor,
) -> None:
    out = confined.execute(
        f"body = {FORGED!r}.encode()\n"
        "frame = len(body).to_bytes(4, 'big') + bytes(8) + body\n"
        "refused = 0\n"
        "for n in list(range(0, 70)) + [999, 1000, 1001]:\n"
        "    try:\n"
        "        open(n, 'wb', buffering=0, closefd=False).write(frame)\n"
        "    except (TypeError, NameError):\n"
        "        refused += 1\n"
        "print('honest', refused)\n",
        10,
    )
    assert out.error is None, out.error
    assert out.stdout == "honest 73\n"


# Outside the policy (through a data library), the channel is whatever the process
# holds: the escape writes a "result" frame to every socket among its descriptors, then
# keeps the cell running. What the host does with that claim is the point.
_FIND_CHANNEL = (
    "import os, stat, threading\n"
    f"body = {FORGED!r}.encode()\n"
    "frame = len(body).to_bytes(4, 'big') + bytes(8) + body\n"
    "sockets = [n for n in range(4096) if _is_socket(n)]\n"
)
_IS_SOCKET = (
    "def _is_socket(n):\n"
    "    try:\n"
    "        return stat.S_ISSOCK(os.fstat(n).st_mode)\n"
    "    except OSError:\n"
    "        return False\n"
)
FORGE_AND_SPIN = {
    "os.write on the channel": "for n in sockets:\n    os.write(n, frame)\n",
    "os.write on a dup of the channel": "for n in sockets:\n    os.write(os.dup(n), frame)\n",
}


@pytest.mark.parametrize("forge", list(FORGE_AND_SPIN))
def test_a_forged_result_does_not_disarm_the_kill(confined: ProcessExecutor, forge: str) -> None:
    if not confined.protections["data_modules"]:
        return  # no data library here, so no route outside the policy to forge from
    code = _IS_SOCKET + _FIND_CHANNEL + FORGE_AND_SPIN[forge] + "while True:\n    pass\n"
    link = confined._link
    out = confined.execute(_via_yaml(code), 1.0)
    assert out.stdout == "forged"  # the host took the claim as the cell's answer...
    # ...but not as proof the cell ended: the worker kept running, and is killed.
    assert link is not None and wait_until(lambda: link.dead, 30)
    after = confined.execute("print(1)", 10)
    assert after.error is not None and "restarted" in after.error
    # Seen busy at once, or (a spinning worker on a loaded machine may get too little
    # CPU to tell within the first check) by the idle watch that follows.
    assert (
        "kept running after it reported its cell had ended" in after.error
        or "used CPU while no cell was running" in after.error
    ), after.error
    assert confined.execute("print(6 * 7)", 10).stdout == "42\n"


def test_a_worker_busy_while_no_cell_runs_is_killed(confined: ProcessExecutor) -> None:
    if not confined.protections["data_modules"]:
        return
    # The cell ends for real; a thread it left behind starts burning CPU later, once
    # the host has seen the worker quiet at the cell's kill deadline (1 s + 1 s grace).
    code = (
        "import threading, time\n"
        "def burn():\n"
        "    time.sleep(3.0)\n"
        "    while True:\n"
        "        pass\n"
        "threading.Thread(target=burn, daemon=True).start()\n"
    )
    link = confined._link
    out = confined.execute(_via_yaml(code) + "print('done')", 1.0)
    assert out.error is None and out.stdout == "done\n"
    assert link is not None and wait_until(lambda: link.dead, 30)
    after = confined.execute("print(1)", 10)
    assert after.error is not None and "used CPU while no cell was running" in after.error
    assert confined.execute("print(6 * 7)", 10).stdout == "42\n"


def test_the_channel_sits_above_every_descriptor_a_cell_can_get() -> None:
    with ProcessExecutor(context="ctx", _allow_raw=True, max_open_files=64) as ex:
        got = ex._run_raw(
            "import gc, resource\n"
            "channel = next(o for o in gc.get_objects() if type(o).__name__ == 'WorkerChannel')\n"
            "result = [channel.fileno(), resource.getrlimit(resource.RLIMIT_NOFILE)[0]]\n"
        )
        fd, nofile = got.value
        assert nofile == 64 and fd >= nofile
