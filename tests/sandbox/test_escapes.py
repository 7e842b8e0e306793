"""Escape chains against the policy layer, by technique, in every sandbox.

Each class of attack is tried several ways (a different trick, not just another
payload): names that are not exact strings, reaching ``type`` or a metaclass, host
frames behind objects the code can hold, cell objects handed to the host, and shared
host state. Every test checks the payload failed *and* that the host (or, in the
process sandbox, the worker that a later cell runs in) is unharmed.
"""

from __future__ import annotations

import collections.abc
import re
import string
import textwrap
from collections.abc import Callable

import pytest

from rlm import REPLEnv
from rlm.parsing import find_code_blocks

# A str subclass whose methods lie to any host code that asks it about itself.
LIAR = """
class S(str):
    def startswith(self, prefix, *args):
        return False
    def endswith(self, suffix, *args):
        return False
    def strip(self, *args):
        return 'answer'
    def isidentifier(self):
        return True
    def lower(self):
        return S(self)
    def __contains__(self, item):
        return False
class Box:
    pass
"""

# A str subclass whose __eq__ says yes to everything (it is unhashable as a result).
YES_MAN = """
class Y(str):
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
"""


def _ok(env: REPLEnv) -> None:
    """The env still runs plain code and sub-queries after the attack."""
    r = env.execute("print(6 * 7)\nFINAL(llm_query('ECHO ok'))")
    assert r.error is None, r.error
    assert r.stdout == "42\n" and r.final == "ok"


def _no_leak(*texts: str | None) -> None:
    # The canary key the env's client holds (see conftest), and no host module globals.
    for text in texts:
        assert "sk-canary" not in (text or "")
        assert "CellOutcome" not in (text or "") and "AsyncOpenAIClient" not in (text or "")


# --------------------------------------------------------------------------- finding 1

NAME_TRICKS = {
    "liar-getattr-user-class": LIAR + "f = getattr(Box, S('__getattribute__'))\nf(llm_query, '__globals__')",
    "liar-getattr-function": LIAR + "getattr(llm_query, S('__globals__'))",
    "liar-getattr-default": LIAR + "print('got', getattr(llm_query, S('__globals__'), 'refused'))",
    "liar-internal-name": LIAR + "g = (x for x in [1])\ngetattr(g, S('gi_frame'))",
    "liar-hasattr": LIAR + "print('has', hasattr(llm_query, S('__globals__')))",
    "liar-setattr-dunder": LIAR + "setattr(Box, S('__getattribute__'), print)",
    "liar-delattr-dunder": LIAR + "delattr(Box, S('__init__'))",
    "liar-attrgetter": LIAR + "import operator\noperator.attrgetter(S('__globals__'))(llm_query)",
    "liar-attrgetter-dotted": LIAR + "import operator\noperator.attrgetter(S('x.__globals__'))(llm_query)",
    "liar-methodcaller": LIAR + "import operator\noperator.methodcaller(S('__reduce_ex__'), 2)(llm_query)",
    "liar-from-join": LIAR
    + "class J(str):\n    def join(self, parts):\n        return S('__globals__')\n"
    + "getattr(llm_query, J('').join(['a']))",
    "liar-from-format": LIAR
    + "class F(str):\n    def format(self, *a):\n        return S('__globals__')\n"
    + "getattr(llm_query, F('{}').format(1))",
    "yes-man-getattr": YES_MAN + "getattr(llm_query, Y('__globals__'))",
    "yes-man-import": YES_MAN + "import json\ngetattr(json, Y('__loader__'))",
    "formatter-parse-yields-subclass": LIAR
    + "import string\nclass F(string.Formatter):\n    def parse(self, s):\n"
    + "        return [('', S('0.__globals__'), '', None)]\nprint(F().format('x', llm_query))",
}


@pytest.mark.parametrize("name", list(NAME_TRICKS))
def test_attribute_names_are_judged_as_exact_strings(
    name: str, make_env: Callable[..., REPLEnv]
) -> None:
    env = make_env(timeout=10.0)
    r = env.execute(NAME_TRICKS[name])
    if r.error is None:  # the getattr-default and hasattr forms answer instead of raising
        assert r.stdout in ("got refused\n", "has False\n"), r.stdout
    else:
        assert "not accessible" in r.error or "not allowed" in r.error, r.error
    _no_leak(r.stdout, r.error)
    _ok(env)


def test_final_var_judges_the_name_as_an_exact_string(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env(timeout=10.0)
    # S('secret_name').strip() lies ('answer'); the real characters name the variable.
    r = env.execute(LIAR + "answer = 'wrong'\nreal = 'right'\nFINAL_VAR(S('real'))")
    assert r.error is None, r.error
    assert r.final == "right"
    r = env.execute(LIAR + "FINAL_VAR(S('_rlm_state_'))")
    assert r.error is not None and "no variable" in r.error
    assert r.final is None


# --------------------------------------------------------------------------- finding 2

TYPE_ROUTES = {
    "typing-type-alias-base": "import typing\nclass M(typing.Type[int]):\n    pass",
    "typing-type-bare-base": "import typing\nclass M(typing.Type):\n    pass",
    "alias-held-in-variable": "import typing\nT = typing.Type[str]\nclass M(T):\n    pass",
    "alias-from-dataclass-field": (
        "import dataclasses, typing\n@dataclasses.dataclass\nclass D:\n    t: typing.Type[int]\n"
        "class M(dataclasses.fields(D)[0].type):\n    pass"
    ),
    "metaclass-view-as-base": "import collections.abc\nclass M(type(collections.abc.Iterable)):\n    pass",
    "type-view-as-base": "class M(type(int)):\n    pass",
    "metaclass-view-call": "import collections.abc\ntype(collections.abc.Sized)('X', (), {})",
    "metaclass-view-new": "import collections.abc\ntype(collections.abc.Sized).__new__",
    "metaclass-view-mro": "import collections.abc\ngetattr(type(collections.abc.Sized), 'mro')",
    "alias-call": "import typing\ntyping.Type[int]('X', (), {})",
    "alias-relay-dunder": "import typing\ngetattr(typing.Type[int], '__origin__')",
    "alias-made-around-the-type-view": (
        "import typing\nA = type(typing.List[int])(type(type), (int,))\nclass M(A):\n    pass"
    ),
    "match-reads-internal-by-position": (
        "import dataclasses\n@dataclasses.dataclass\nclass C:\n    gi_frame: int\n"
        "match C(1):\n    case C(f):\n        print('read', f)"
    ),
    "match-reads-guarded-value": (
        "import re\nmatch re.compile('(?P<a>x)'):\n    case re.Pattern(groupindex=g):\n        print(g)"
    ),
}


@pytest.mark.parametrize("name", list(TYPE_ROUTES))
def test_type_and_metaclasses_stay_out_of_reach(name: str, make_env: Callable[..., REPLEnv]) -> None:
    env = make_env(timeout=10.0)
    r = env.execute(TYPE_ROUTES[name])
    assert r.error is not None, f"payload ran: {r!r}"
    assert "read" not in r.stdout
    _no_leak(r.stdout, r.error)
    _ok(env)


def test_a_class_with_a_type_base_gives_no_class_factory(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env(timeout=10.0)
    r = env.execute(
        "import typing\ntry:\n    class M(typing.Type[int]):\n        pass\n"
        "except TypeError as e:\n    print('refused:', e)\nprint('M' in dir())"
    )
    assert r.error is None, r.error
    assert "metaclasses" in r.stdout and r.stdout.endswith("False\n")


def test_match_leaves_no_pattern_class_behind(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env(timeout=10.0)
    r = env.execute(
        "import dataclasses\n@dataclasses.dataclass\nclass P:\n    x: int\n"
        "class K:\n    match P(1):\n        case P(a) | list([a]):\n            found = a\n"
        "print(K.found, K._rlm_mc0_, K._rlm_mc1_)"
    )
    assert r.error is None, r.error
    assert r.stdout == "1 None None\n"
    # ``type`` in a cell is a stand-in, not a class: Python refuses it as a pattern (in
    # words that differ between versions), so the real type is never used and nothing matches.
    r = env.execute("matched = False\nmatch 1:\n    case type():\n        matched = True")
    assert r.error is not None and "TypeError" in r.error
    assert env.execute("print(matched)").stdout == "False\n"


# --------------------------------------------------------------------------- finding 3

FRAME_ROUTES = {
    "iter-sentinel-gi-frame": "it = iter(int, 1)\ngetattr(it, 'gi_frame')",
    "iter-sentinel-liar": LIAR + "it = iter(int, 1)\ngetattr(it, S('gi_frame'))",
    "itertools-count-frame": "import itertools\ngetattr(itertools.count(), 'gi_frame')",
    "async-query-cr-frame": "c = llm_query_async('ECHO 1')\ngetattr(c, 'cr_frame')",
    "async-query-liar": LIAR + "c = llm_query_async('ECHO 1')\ngetattr(c, S('cr_frame'))",
    "async-query-cr-await": "c = llm_query_async('ECHO 1')\ngetattr(c, 'cr_await')",
    "anext-cr-frame": (
        "async def ag():\n    yield 1\ngetattr(anext(ag()), 'cr_frame')"
    ),
    "error-traceback": "try:\n    llm_query(123)\nexcept TypeError as e:\n    getattr(e, '__traceback__')",
    "error-traceback-liar": LIAR
    + "try:\n    llm_query(123)\nexcept TypeError as e:\n    getattr(e, S('__traceback__'))",
    "error-context-chain": "try:\n    llm_query(123)\nexcept TypeError as e:\n    getattr(e, '__context__')",
    "own-generator-f-back": LIAR
    + "def g():\n    yield 1\nx = g()\nnext(x)\ngetattr(getattr(x, S('gi_frame')), 'f_back')",
    "format-field-frame": "it = iter(int, 1)\n'{0.gi_frame}'.format(it)",
    "asyncio-sleep-cr-frame": "import asyncio\ngetattr(asyncio.sleep(0), 'cr_frame')",
    "asyncio-gather-send": "import asyncio\nasyncio.gather(llm_query_async('ECHO 1')).send(None)",
    "as-completed-item-frame": (
        "import asyncio\nfor a in asyncio.as_completed([llm_query_async('ECHO 1')]):\n"
        "    getattr(a, 'cr_frame')"
    ),
}


@pytest.mark.parametrize("name", list(FRAME_ROUTES))
def test_host_frames_are_unreachable(name: str, make_env: Callable[..., REPLEnv]) -> None:
    env = make_env(timeout=10.0)
    r = env.execute(FRAME_ROUTES[name])
    assert r.error is not None, f"payload ran: {r!r}"
    assert "frame object" not in r.stdout
    _no_leak(r.stdout, r.error)
    _ok(env)


def test_objects_wrapping_host_code_have_nothing_public(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env(timeout=10.0)
    r = env.execute(
        "import itertools\nasync def ag():\n    yield 1\n"
        "import asyncio\nc = llm_query_async('ECHO 1')\n"
        "held = [iter(int, 1), itertools.count(), itertools.cycle([1]), c, anext(ag()),\n"
        "        asyncio.sleep(0), asyncio.gather(), llm_query_batch_async(['ECHO 2'])]\n"
        "print([n for h in held for n in dir(h)])\n"
        "print(await c, await held[-1], await asyncio.gather(held[-3], llm_query_async('ECHO 3')))"
    )
    assert r.error is None, r.error
    assert r.stdout == "[]\n1 ['2'] [None, '3']\n"


# --------------------------------------------------------------------------- finding 4

# Every overridable method of the subclasses records that it ran: converting a prompt
# for the host must read the data without running any of them.
RECORDER = """
ran = []
class D(dict):
    def items(self):
        ran.append('items')
        return dict.items(self)
    def keys(self):
        ran.append('keys')
        return dict.keys(self)
    def get(self, k, d=None):
        ran.append('get')
        return dict.get(self, k, d)
class L(list):
    def copy(self):
        ran.append('copy')
        return list(self)
class T(str):
    def encode(self, *a):
        ran.append('encode')
        return b''
    def strip(self, *a):
        ran.append('strip')
        return ''
"""


@pytest.mark.parametrize(
    "call",
    [
        "llm_query(T('ECHO hi'))",
        "llm_query(L([D(role=T('user'), content=T('ECHO hi'))]))",
        "llm_query_batch(L([T('ECHO hi')]))[0]",
        "llm_query('ECHO hi', stop=L([T('zz')]), logit_bias=D(a=1))",
        "await llm_query_async(T('ECHO hi'))",
        "(await llm_query_batch_async([L([D(role='user', content='ECHO hi')])]))[0]",
    ],
)
def test_cell_objects_never_reach_the_host(call: str, make_env: Callable[..., REPLEnv]) -> None:
    env = make_env(timeout=10.0)
    r = env.execute(RECORDER + f"reply = {call}\nprint(reply, ran)")
    assert r.error is None, r.error
    assert r.stdout == "hi []\n"


def test_parameter_names_are_judged_as_exact_strings(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env(timeout=10.0)
    for name in ("base_url", "api_key"):
        r = env.execute(LIAR + f"llm_query('ECHO 1', **{{S('{name}'): 'http://127.0.0.1:9'}})")
        assert r.error is not None and "unsupported parameter" in r.error, r.error
    _ok(env)


def test_a_too_deep_prompt_is_refused_in_the_cell(make_env: Callable[..., REPLEnv]) -> None:
    env = make_env(timeout=10.0)
    r = env.execute(
        "m = 'x'\nfor i in range(100):\n    m = [m]\nllm_query([{'role': 'user', 'content': m}])"
    )
    assert r.error is not None and "TypeError" in r.error
    _ok(env)


# --------------------------------------------------------------------------- finding 6

MUTATOR = """
def spoil(d):
    d['zz'] = 1
    d[98] = 'Q'
class E:
    def __eq__(self, other):
        spoil(other)
        return True
    def __ne__(self, other):
        spoil(other)
        return False
    def __lt__(self, other):
        spoil(other)
        return True
    def __ge__(self, other):
        spoil(other)
        return True
"""

FENCE = r"^[ \t]*```[ \t]*(?P<lang>repl|python|py|python3)?[ \t]*\n(?P<body>.*?)^[ \t]*```[ \t]*$"

SHARED_STATE = {
    "abcmeta-register-through-view": (
        "import collections.abc\ntype(collections.abc.Mapping).register(collections.abc.Mapping, bytes)"
    ),
    "register-through-subclass": (
        "import collections.abc\nclass U(collections.abc.Mapping):\n    pass\nU.register(bytes)"
    ),
    "register-through-methodcaller": (
        "import collections.abc, operator\n"
        "operator.methodcaller('register', bytes)(collections.abc.Mapping)"
    ),
    "register-through-alias": "import typing\ntyping.Mapping[str, int].register(bytes)",
    "register-through-made-alias": (
        "import collections.abc, typing\n"
        "A = type(typing.List[int])(collections.abc.Mapping, (int,))\nA.register(bytes)"
    ),
    "groupindex-reflected-eq": MUTATOR
    + "import re\np = re.compile(PATTERN, re.DOTALL | re.MULTILINE)\n"
    + "p.groupindex == E()\np.groupindex != E()\np.groupindex > E()\np.groupindex <= E()",
    "template-pattern-groupindex": MUTATOR
    + "import string\nstring.Template.pattern.groupindex == E()",
    "textwrap-class-attr": MUTATOR
    + "import textwrap\ntextwrap.TextWrapper.unicode_whitespace_trans == E()\n"
    + "textwrap.TextWrapper().unicode_whitespace_trans == E()",
    "groupindex-through-match": MUTATOR
    + "import re\nmatch re.compile(PATTERN, re.DOTALL | re.MULTILINE):\n"
    + "    case re.Pattern(groupindex=g):\n        g == E()",
}


@pytest.mark.parametrize("name", list(SHARED_STATE))
def test_shared_host_state_stays_unchanged(name: str, make_env: Callable[..., REPLEnv]) -> None:
    env = make_env(timeout=10.0)
    other = make_env(timeout=10.0)
    wrap = "print(repr(textwrap.TextWrapper(width=5).fill('a\\tb c')))"
    before = other.execute("import textwrap\n" + wrap).stdout
    assert before == "'a\\nb c'\n"
    env.execute(SHARED_STATE[name].replace("PATTERN", repr(FENCE)))
    # The host: ABCs, the compiled patterns our own parsing uses, stdlib classes.
    assert not isinstance(b"", collections.abc.Mapping)
    assert find_code_blocks("```repl\nprint(1)\n```") == ["print(1)\n"]
    assert "zz" not in re.compile(FENCE, re.DOTALL | re.MULTILINE).groupindex
    assert "zz" not in string.Template.pattern.groupindex
    assert 98 not in textwrap.TextWrapper.unicode_whitespace_trans
    # The attacker's own REPL and another REPL see the same clean state.
    check = (
        "import collections.abc, re, textwrap\n"
        f"p = re.compile({FENCE!r}, re.DOTALL | re.MULTILINE)\n"
        "print(isinstance(b'', collections.abc.Mapping), 'zz' in p.groupindex)\n" + wrap
    )
    for e in (env, other):
        r = e.execute(check)
        assert r.error is None, r.error
        assert r.stdout == "False False\n" + before
    _ok(env)


@pytest.mark.parametrize(
    "code",
    [
        "FINAL(S('the answer'))",
        "x = S('the answer')\nFINAL_VAR('x')",
        "FINAL(S('the answer').lower())",
    ],
)
def test_final_hands_the_host_an_exact_str(code: str, make_env: Callable[..., REPLEnv]) -> None:
    env = make_env(timeout=10.0)
    r = env.execute(LIAR + "class S(str):\n    def strip(self, *a):\n        while True:\n            pass\n" + code)
    assert r.error is None, r.error
    assert type(r.final) is str
    assert r.final.strip() == "the answer"  # would spin forever on the cell's subclass
