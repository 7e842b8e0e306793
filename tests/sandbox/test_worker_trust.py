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


def _via_a_submodule(code: str) -> str:
    return (
        f"open('frame.pkl', 'wb').write({_pickle_running(code)!r})\n"
        "from pandas.io.pickle import read_pickle\n"
        "read_pickle('frame.pkl')\n"
    )


def _via_from_import(code: str) -> str:
    return f"from yaml import unsafe_load\nunsafe_load({_yaml_exec(code)})\n"


def _via_numpy_allow_pickle(code: str) -> str:
    return (
        f"open('data.npy', 'wb').write({_pickle_running(code)!r})\n"
        "import numpy as np\n"
        "np.load('data.npy', allow_pickle=True)\n"
    )


def _via_pandas_read_pickle(code: str) -> str:
    return (
        f"open('frame.pkl', 'wb').write({_pickle_running(code)!r})\n"
        "import pandas\n"
        "pandas.read_pickle('frame.pkl')\n"
    )


ROUTES: dict[str, Callable[[str], str]] = {
    "yaml.unsafe_load": _via_yaml,
    "yaml imported in a nested function": _via_yaml_in_a_nested_function,
    "from pandas.io.pickle import read_pickle": _via_a_submodule,
    "from yaml import unsafe_load": _via_from_import,
    "numpy.load(allow_pickle=True)": _via_numpy_allow_pickle,
    "pandas.read_pickle": _via_pandas_read_pickle,
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
