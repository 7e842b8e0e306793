"""Attack payloads against the sandbox: each is refused or neutralised, harmlessly.

Every payload runs in a fresh env whose client holds a canary API key (also set as
OPENAI_API_KEY). Each test checks that the payload was refused (an error in the cell,
never an exception in the host) or neutralised, that it had no side effect (the canary
file does not exist, the key appears in no output), and that the env still runs a
follow-up cell. The suite runs for every sandbox in ``conftest.SANDBOXES``.
"""

from __future__ import annotations

import collections
import collections.abc
import decimal
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from rlm import ExecResult, REPLEnv


@dataclass(frozen=True)
class Attack:
    """A payload and what must happen: ``refused`` (an error naming ``hint``, or one of
    its ``|``-separated alternatives),
    ``timeout`` (stopped at the deadline) or ``neutral`` (runs, achieves nothing:
    ``hint`` must then appear in stdout)."""

    code: str
    outcome: str = "refused"
    hint: str = ""


A = Attack

ATTACKS: dict[str, Attack] = {
    # -- dunder and subclass walks
    "subclasses-walk": A("().__class__.__bases__[0].__subclasses__()", hint="_"),
    "catch-warnings-walk": A(
        "[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'catch_warnings'][0]()",
        hint="_",
    ),
    "getattr-class": A("getattr(getattr((), '__class__'), '__bases__')", hint="not accessible"),
    "getattr-concat": A("getattr(1, '__cl' + 'ass__')", hint="not accessible"),
    "mro-static": A("type(()).mro()", hint="mro"),
    "mro-dynamic": A("getattr(type(()), 'mro')()", hint="not accessible"),
    "object-subclasses": A("object.__subclasses__()", hint="_"),
    "func-globals": A("llm_query.__globals__", hint="_"),
    "func-closure-dynamic": A("getattr(llm_query, '__closure__')", hint="not accessible"),
    "func-code-dynamic": A("getattr(FINAL, '__code__')", hint="not accessible"),
    "print-self": A("print.__self__", hint="_"),
    "print-self-dynamic": A("getattr(print, '__self__')", hint="not accessible"),
    "super-walk": A("super(type, type).__subclasses__()", hint="_"),
    "public-attrs-of-closures": A(
        "found = [getattr(f, n) for f in (llm_query, llm_query_batch, FINAL, FINAL_VAR) "
        "for n in dir(f)]\nprint('public', found)",
        outcome="neutral",
        hint="public []",
    ),
    "named-internals-absent": A(
        "print('none', [getattr(llm_query, n, None) for n in "
        "('client', 'func', 'args', 'keywords', 'env', 'api_key')])",
        outcome="neutral",
        hint="none [None, None, None, None, None, None]",
    ),
    # -- forbidden imports
    **{
        f"import-{mod}": A(f"import {mod}", hint="Allowed modules")
        for mod in (
            "os", "subprocess", "ctypes", "pickle", "marshal", "gc", "threading",
            "signal", "socket", "importlib", "inspect", "pathlib",
        )
    },  # fmt: skip
    # sys, io and asyncio are facades holding a few harmless names
    **{
        f"facade-{mod}-{attr}": A(f"import {mod}\n{mod}.{attr}", hint="has no attribute")
        for mod, attr in (
            ("sys", "modules"), ("sys", "path"), ("sys", "exit"), ("sys", "settrace"),
            ("io", "open"), ("io", "FileIO"), ("asyncio", "get_event_loop"),
            ("asyncio", "events"), ("asyncio", "create_subprocess_exec"),
            ("asyncio", "open_connection"), ("asyncio", "Task"), ("asyncio", "Future"),
        )
    },  # fmt: skip
    "import-builtins": A("import builtins", hint="reserved"),
    "from-os-import": A("from os import system", hint="Allowed modules"),
    "import-os-path": A("import os.path", hint="Allowed modules"),
    "dunder-import": A("__import__('os')", hint="_"),
    "relative-import": A("from . import secrets", hint="relative"),
    "import-submodule-of-allowed": A("import json.decoder", hint="Allowed modules"),
    "from-import-submodule": A("from json import decoder", hint="cannot import"),
    # -- module-chain escapes through allowed modules
    "random-os-static": A("import random\nrandom._os", hint="_"),
    "random-os-dynamic": A("import random\ngetattr(random, '_os')", hint="private"),
    "private-attr-of-host-object": A("import re\nre.compile('x')._pattern", hint="private"),
    "private-attr-of-closure": A("llm_query._client", hint="private"),
    "facade-reinit": A("import json\njson.__init__('json', {'dumps': print})", hint="_"),
    "facade-reinit-dynamic": A("import json\ngetattr(json, '__init__')", hint="not accessible"),
    "super-two-args-init": A("import json\nsuper(type(json), json).__init__('json', {})", hint="_"),
    "write-readable-dunder": A("def f():\n    pass\nf.__name__ = 'x'", hint="_"),
    "setattr-readable-dunder": A("def f():\n    pass\nsetattr(f, '__doc__', 'x')", hint="not accessible"),
    "namedtuple-api-on-non-tuple": A("llm_query._replace", hint="private"),
    "json-decoder-attr": A("import json\njson.decoder.re", hint="has no attribute"),
    "typing-sys": A("import typing\ntyping.sys.modules", hint="has no attribute"),
    "dataclasses-sys": A("import dataclasses\ndataclasses.sys", hint="has no attribute"),
    "dataclasses-inspect": A("import dataclasses\ndataclasses.inspect", hint="has no attribute"),
    "collections-abc-sys": A("import collections\ncollections.abc.sys", hint="has no attribute"),
    "re-enum": A("import re\nre.enum", hint="has no attribute"),
    "typing-get-type-hints": A(
        "import typing\ndef f(x: 'sys'): pass\ntyping.get_type_hints(f)", hint="has no attribute"
    ),
    "make-dataclass-dunders": A(
        "import dataclasses\ndataclasses.make_dataclass('X', [], namespace={})",
        hint="has no attribute",
    ),
    "update-wrapper-globals": A(
        "import functools\ndef f(): pass\nfunctools.update_wrapper(f, llm_query, "
        "assigned=('__globals__',), updated=('__dict__',))",
        hint="no assigned/updated",
    ),
    "singledispatch-absent": A("import functools\nfunctools.singledispatch", hint="has no attribute"),
    "attrgetter-dunder": A("import operator\noperator.attrgetter('__globals__')(llm_query)", hint="not accessible"),
    "methodcaller-dunder": A("import operator\noperator.methodcaller('__reduce_ex__', 2)(llm_query)", hint="not accessible"),
    "pretty-printer-host-stdout": A("import pprint\npprint.PrettyPrinter().pprint(1)", hint="has no attribute"),
    "time-tzset": A("import time\ntime.tzset()", hint="has no attribute"),
    "csv-global-limit": A(  # per-REPL: the process-wide limit never goes down
        "import csv\ncsv.field_size_limit(1)\nprint('limit', csv.field_size_limit())",
        outcome="neutral", hint="limit 1",
    ),
    "decimal-default-context": A("import decimal\ndecimal.DefaultContext.prec = 1", hint="has no attribute"),
    "monkeypatch-stdlib-class": A(
        "from collections import Counter\nCounter.most_common = None", hint="cannot set"
    ),
    "setattr-stdlib-module": A("import json\nsetattr(json, 'dumps', None)", hint="cannot set"),
    "assign-facade-attr": A("import json\njson.dumps = None", hint="cannot set"),
    "delete-facade-attr": A("import json\ndel json.dumps", hint="cannot set"),
    "augassign-stdlib-class": A("from collections import Counter\nCounter.x += 1", hint="has no attribute"),
    "dataclass-on-stdlib-class": A(
        "import collections, dataclasses\ndataclasses.dataclass(collections.Counter)",
        hint="only be applied",
    ),
    "total-ordering-on-stdlib": A(
        "import functools, decimal\nfunctools.total_ordering(decimal.Context)", hint="only be applied"
    ),
    "abc-register-shared": A(
        "import collections.abc\ncollections.abc.Mapping.register(list)", hint="register"
    ),
    "typing-alias-register": A("import typing\ntyping.Sequence.register(int)", hint="register"),
    # -- getattr, format, format_map and Formatter tricks
    "format-class": A("'{0.__class__.__mro__}'.format(1)", hint="not accessible"),
    "format-globals": A("'{0.__globals__}'.format(llm_query)", hint="not accessible"),
    "format-map-globals": A("'{x.__globals__}'.format_map({'x': llm_query})", hint="not accessible"),
    "unbound-str-format": A("str.format('{0.__class__}', 1)", hint="not accessible"),
    "format-gi-frame": A("'{0.gi_frame}'.format(x for x in [1])", hint="not accessible"),
    "nested-format-spec": A("'{0:{1.__class__}}'.format(1, 2)", hint="not accessible"),
    "str-subclass-format": A("class S(str):\n    pass\nS.format('{0.__class__}', 1)", hint="not accessible"),
    "str-subclass-bound-format": A("class S(str):\n    pass\nS('{0.__class__}').format(1)", hint="not accessible"),
    "super-format": A(
        "class S(str):\n    def leak(self):\n        return super().format(1)\nS('{0.__class__}').leak()",
        hint="not accessible",
    ),
    "methodcaller-format": A(
        "import operator\noperator.methodcaller('format', 1)('{0.__class__}')", hint="not accessible"
    ),
    "typing-origin-type": A(
        "import typing\ntyping.get_origin(typing.Type[int])('X', (), {})", hint="has no attribute"
    ),
    "typing-type-call": A("import typing\ntyping.Type('X', (), {})", hint="cannot be instantiated"),
    "string-formatter": A(
        "import string\nstring.Formatter().format('{0.__globals__}', llm_query)", hint="not accessible"
    ),
    "fstring-dunder": A("f'{llm_query.__globals__}'", hint="_"),
    "hasattr-probe": A(
        "print('probe', hasattr(llm_query, '__globals__'), hasattr(1, '__class__'))",
        outcome="neutral",
        hint="probe False False",
    ),
    # -- frames through generators, coroutines, async generators, tracebacks
    "gen-frame-static": A("g = (x for x in [1])\ng.gi_frame", hint="gi_frame"),
    "gen-frame-dynamic": A("g = (x for x in [1])\ngetattr(g, 'gi_frame').f_globals", hint="not accessible"),
    "coro-frame-static": A("async def f():\n    pass\nc = f()\nc.cr_frame", hint="cr_frame"),
    "coro-frame-dynamic": A("async def f():\n    pass\ngetattr(f(), 'cr_frame')", hint="not accessible"),
    "asyncgen-frame": A("async def f():\n    yield 1\ngetattr(f(), 'ag_frame')", hint="not accessible"),
    "coro-send-leaks-future": A("c = llm_query_async('ECHO 1')\nc.send(None)", hint="send()"),
    "coro-send-dynamic": A("c = llm_query_async('ECHO 1')\ngetattr(c, 'send')(None)", hint="send()"),
    "asyncgen-asend": A(
        "async def g():\n    yield await llm_query_async('ECHO 1')\ng().asend(None)", hint="asend()"
    ),
    "anext-iterated": A(
        "async def g():\n    yield await llm_query_async('ECHO 1')\nfor fut in anext(g()):\n    print(fut)",
        hint="not iterable",
    ),
    "yield-from-coroutine": A(
        "def g():\n    yield from llm_query_async('ECHO 1')\nnext(g())", hint="not iterable"
    ),
    "traceback-static": A("try:\n    1/0\nexcept Exception as e:\n    e.__traceback__", hint="_"),
    "traceback-dynamic": A(
        "try:\n    1/0\nexcept Exception as e:\n    getattr(e.with_traceback(None), '__traceback__')",
        hint="not accessible",
    ),
    "tb-frame-static": A("def f(tb):\n    return tb.tb_frame", hint="tb_frame"),
    "attribute-error-obj": A(
        "try:\n    llm_query.nope\nexcept AttributeError as e:\n    e.obj", hint="not accessible"
    ),
    "match-frame-attr": A(
        "g = (x for x in [1])\nmatch g:\n    case object(gi_frame=f):\n        print(f)", hint="gi_frame"
    ),
    "match-dunder-attr": A("match 1:\n    case object(__class__=c):\n        print(c)", hint="__class__"),
    "match-bind-guard-name": A("match 1:\n    case _getattr_:\n        pass", hint="_"),
    # -- exec, eval, compile and their Unicode-normalised spellings
    "exec": A("exec('import os')", hint="exec"),
    "eval": A("eval('1+1')", hint="eval"),
    "compile": A("compile('1', 'x', 'eval')", hint="compile"),
    "exec-fullwidth": A("\uff45\uff58\uff45\uff43('import os')", hint="exec"),
    "eval-fullwidth": A("\uff45\uff56\uff41\uff4c('1')", hint="eval"),
    "dunder-fullwidth": A("().__\uff43\uff4c\uff41\uff53\uff53__", hint="_"),
    "exec-by-reference": A("f = exec\nf('import os')", hint="not available"),
    # -- globals, vars, builtins
    "globals": A("globals()['__builtins__']", hint="not available"),
    "locals-stop-flag": A("locals()['_rlm_stop_'] = False", hint="not available"),
    "vars": A("vars()", hint="not available"),
    "builtins-name": A("__builtins__['open']", hint="_"),
    "dir-hides-internals": A(
        "print('names', [n for n in dir() if n.startswith('_')])", outcome="neutral", hint="names []"
    ),
    # -- file access
    # open() is absent, or (a confined worker, see protections["file_access"]) real but
    # inside the worker's private root, where host paths do not exist.
    "open-read": A("open('/etc/passwd').read()", hint="not available|No such file"),
    "open-write-canary": A("open('CANARY', 'w').write('x')", hint="not available|No such file"),
    "pathlib-write": A("import pathlib\npathlib.Path('CANARY').write_text('x')", hint="Allowed modules"),
    "os-system": A("import os\nos.system('touch CANARY')", hint="Allowed modules"),
    # -- environment variables and the API key
    "environ": A("import os\nos.environ['OPENAI_API_KEY']", hint="Allowed modules"),
    "param-api-key": A("llm_query('ECHO 1', api_key='x')", hint="unsupported parameter"),
    "param-base-url": A("llm_query('ECHO 1', base_url='http://127.0.0.1:1')", hint="unsupported parameter"),
    "param-callback": A("llm_query_batch(['ECHO 1'], on_item_done=print)", hint="unsupported parameter"),
    "repr-of-closures": A(
        "print('repr', repr(llm_query), repr(llm_query_batch_async))", outcome="neutral", hint="repr <function"
    ),
    # -- metaclasses and guard shadowing
    "rebind-getattr-guard": A("_getattr_ = lambda o, n: 1", hint="_"),
    "rebind-write-guard": A("_write_ = None", hint="_"),
    "global-stop-flag": A("global _rlm_stop_\n_rlm_stop_ = False", hint="_"),
    "rebind-print": A("print = 1", hint="reserved"),
    "metaclass-keyword": A("class M(type):\n    pass\nclass X(metaclass=M):\n    pass", hint="metaclass"),
    "type-three-args": A("type('X', (), {'__del__': None})", hint="class statement"),
    "type-of-type": A("type(type)('X', (), {})", hint="class statement"),
    "abcmeta-call": A("import collections.abc\ntype(collections.abc.Iterable)('X', (), {})", hint="class statement"),
    "dunder-in-class-body": A("class X:\n    __del__ = None", hint="_"),
    "setattr-dunder": A("class X:\n    pass\nsetattr(X, '__del__', None)", hint="not accessible"),
    # -- SystemExit, KeyboardInterrupt and exit-like tricks
    "system-exit": A("raise SystemExit(0)", hint="SystemExit"),
    "keyboard-interrupt": A("raise KeyboardInterrupt", hint="KeyboardInterrupt"),
    "exit-call": A("exit()", hint="FINAL"),
    "quit-call": A("quit()", hint="FINAL"),
    "generator-exit": A("raise GeneratorExit", hint="GeneratorExit"),
    "custom-base-exception": A("class Boom(BaseException):\n    pass\nraise Boom('x')", hint="Boom"),
    "sys-exit": A("import sys\nsys.exit(1)", hint="has no attribute"),
    # -- infinite loops and recursion
    "while-true": A("while True:\n    pass", outcome="timeout"),
    "huge-range": A("for i in range(10**12):\n    pass", outcome="timeout"),
    "sum-count": A("import itertools\nsum(itertools.count())", outcome="timeout"),
    "any-repeat": A("import itertools\nany(itertools.repeat(0))", outcome="timeout"),
    "list-cycle": A("import itertools\nlist(itertools.cycle([1]))", outcome="timeout"),
    "max-iter-callable": A("max(iter(int, 1))", outcome="timeout"),
    "sorted-count": A("import itertools\nsorted(itertools.count())", outcome="timeout"),
    "set-of-huge-range": A("set(range(10**12))", outcome="timeout"),
    "sum-huge-range": A("sum(range(10**13))", outcome="timeout"),
    "deque-count": A("import collections, itertools\ncollections.deque(itertools.count(), maxlen=1)", outcome="timeout"),
    "join-infinite-genexp": A("import itertools\n''.join(str(i) for i in itertools.count())", outcome="timeout"),
    "reduce-count": A("import functools, itertools, operator\nfunctools.reduce(operator.add, itertools.count())", outcome="timeout"),
    "huge-comprehension": A("x = [i for i in range(10**12)]", outcome="timeout"),
    "swallow-timeout": A(
        "while True:\n    try:\n        while True:\n            pass\n    except BaseException:\n        pass",
        outcome="timeout",
    ),
    "sleep": A("import time\ntime.sleep(1000)", outcome="timeout"),
    "async-spin": A("async def spin():\n    while True:\n        pass\nawait spin()", outcome="timeout"),
    "recursion": A("def f():\n    return f()\nf()", hint="RecursionError"),
    "mutual-recursion": A("def a(n):\n    return b(n + 1)\ndef b(n):\n    return a(n + 1)\na(0)", hint="RecursionError"),
    # -- output floods
    "flood-loop": A("while True:\n    print('x' * 1000)", outcome="timeout"),
    "flood-one-print": A("print('y' * 10**7)\nprint('done', 'flood')", outcome="neutral", hint="done flood"),
}


def _check_no_leak(r: ExecResult, secret: str, canary: Path) -> None:
    for text in (r.stdout, r.stderr, r.error or ""):
        assert secret not in text
        assert "AsyncOpenAIClient object" not in text
    assert not canary.exists()


def _check_still_works(env: REPLEnv) -> None:
    after = env.execute("print(6 * 7)\nFINAL(llm_query('ECHO ok'))")
    assert after.error is None, after.error
    assert after.stdout == "42\n"
    assert after.final == "ok"


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_refused_or_neutralised(
    name: str, make_env: Callable[..., REPLEnv], secret: str, canary: Path
) -> None:
    attack = ATTACKS[name]
    env = make_env(max_output_chars=5_000)
    r = env.execute(attack.code.replace("CANARY", str(canary)))
    if attack.outcome == "refused":
        assert r.error is not None, f"payload ran: {r!r}"
        assert any(h in r.error for h in attack.hint.split("|")), r.error
    elif attack.outcome == "timeout":
        assert r.error is not None and "TimeoutError" in r.error, r.error
    else:
        assert attack.hint in r.stdout, r
    _check_no_leak(r, secret, canary)
    _check_still_works(env)


def test_attack_suite_is_large_enough() -> None:
    assert len(ATTACKS) >= 60


def test_output_flood_is_capped_with_head_and_tail(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env(max_output_chars=1_000, timeout=30.0)  # a loaded machine is slow, not wrong
    r = env.execute("for i in range(100_000):\n    print(i)")
    assert r.error is None
    assert r.truncated
    assert len(r.stdout) < 1_200
    assert r.stdout.startswith("0\n1\n2\n")
    assert r.stdout.endswith("99998\n99999\n")
    assert "characters truncated" in r.stdout


def test_stdlib_classes_stay_unchanged_for_the_host(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env()
    for code in (
        "from collections import Counter\nCounter.most_common = None",
        "import collections.abc\ncollections.abc.Mapping.register(list)",
        "import collections, dataclasses\ndataclasses.dataclass(collections.Counter)",
        "import decimal\ndecimal.getcontext().prec = 5",
    ):
        env.execute(code)
    assert callable(collections.Counter.most_common)
    assert not isinstance([], collections.abc.Mapping)
    assert "__dataclass_fields__" not in vars(collections.Counter)
    assert decimal.DefaultContext.prec == 28
    assert json.dumps([1]) == "[1]"


def test_payload_print_does_not_touch_host_stdout(
    make_env: Callable[..., REPLEnv], capsys: pytest.CaptureFixture[str]
) -> None:
    env = make_env()
    r = env.execute("import pprint\nprint('to the cell')\npprint.pprint({'a': 1})")
    assert r.stdout == "to the cell\n{'a': 1}\n"
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
