"""The class-creation guard, in every sandbox: no class a cell makes can pass for another value.

A subclass of a value type (str, int, tuple, Enum ...) with its own ``__eq__``/``__hash__``
could answer for another key in the caches of re, _strptime or typing, for every REPL and
the host. Each way a cell can make a class is tried; each ends in the same refusal. The
classes real models write (enums with a str mixin, NamedTuples, frozen dataclasses,
cached functions, ordering hooks) keep working.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from rlm import REPLEnv

EQ = "    def __eq__(self, other):\n        return True\n"

ROUTES = {
    "str-subclass": "class K(str):\n" + EQ,
    "int-subclass": "class K(int):\n" + EQ,
    "float-subclass": "class K(float):\n" + EQ,
    "complex-subclass": "class K(complex):\n" + EQ,
    "bytes-subclass": "class K(bytes):\n" + EQ,
    "tuple-subclass": "class K(tuple):\n" + EQ,
    "frozenset-subclass": "class K(frozenset):\n" + EQ,
    "decimal-subclass": "import decimal\nclass K(decimal.Decimal):\n" + EQ,
    "ne-only": "class K(str):\n    def __ne__(self, other):\n        return False\n",
    "subclass-of-a-plain-subclass": "class S(str):\n    pass\nclass K(S):\n" + EQ,
    "cell-mixin-before-the-value-type": "class Mix:\n" + EQ + "class K(Mix, int):\n    pass\n",
    "unsafe-hash-on-str": (
        "import dataclasses\n@dataclasses.dataclass(unsafe_hash=True)\nclass K(str):\n"
        "    n: int = 0\n" + EQ
    ),
    "frozen-dataclass-on-str": (
        "import dataclasses\n@dataclasses.dataclass(frozen=True)\nclass K(str):\n    n: int = 0\n"
    ),
    "unsafe-hash-on-a-plain-class": (
        "import dataclasses\n@dataclasses.dataclass(unsafe_hash=True)\nclass K:\n    n: int = 0\n"
    ),
    "frozen-dataclass-with-its-own-eq": (
        "import dataclasses\n@dataclasses.dataclass(frozen=True)\nclass K:\n    n: int = 0\n" + EQ
    ),
    "hash-from-a-frozen-mixin": (
        "import dataclasses\n@dataclasses.dataclass(frozen=True)\nclass H:\n    n: int = 0\n"
        "class K(H, str):\n    pass\n"
    ),
    "typing-namedtuple-eq": "import typing\nclass K(typing.NamedTuple):\n    n: int\n" + EQ,
    "enum-mixin-eq": "import enum\nclass K(str, enum.Enum):\n    A = 'a'\n" + EQ,
    "plain-enum-eq": "import enum\nclass K(enum.Enum):\n    A = 1\n" + EQ,
    "enum-functional-dunder": (
        "import enum\nK = enum.Enum('K', [('A', 1), ('__eq__', lambda s, o: True)], type=int)\n"
    ),
    "enum-functional-hash": (
        "import enum\nK = enum.Enum('K', {'A': 'a', '__hash__': lambda s: 0}, type=str)\n"
    ),
    "enum-functional-on-a-cell-enum": (
        "import enum\nclass Base(str, enum.Enum):\n    pass\n"
        "K = Base('K', [('A', 'a'), ('__eq__', lambda s, o: True)])\n"
    ),
    "enum-functional-module-spoof": "import enum\nK = enum.Enum('K', 'A B', module='re')\n",
    "namedtuple-module-spoof": "import collections\nK = collections.namedtuple('K', 'a', module='re')\n",
    "type-three-arguments": "K = type('K', (str,), {'__eq__': lambda s, o: True})\n",
    "metaclass-of-a-str-subclass": "class S(str):\n    pass\nK = type(S)('K', (S,), {})\n",
    "setattr-after-creation": "class K(str):\n    pass\nsetattr(K, '__eq__', lambda s, o: True)\n",
    "types-new-class": "import types\nK = types.new_class('K', (str,), exec_body=lambda ns: ns)\n",
    "int-enum-eq": "import enum\nclass K(enum.IntEnum):\n    A = 1\n" + EQ,
    "make-dataclass": (
        "import dataclasses\nK = dataclasses.make_dataclass('K', ['a'], bases=(str,), unsafe_hash=True)\n"
    ),
}


@pytest.mark.parametrize("name", list(ROUTES))
def test_no_route_makes_a_value_class_with_its_own_equality(
    name: str, make_env: Callable[..., REPLEnv]
) -> None:
    env = make_env(timeout=10.0)
    r = env.execute(ROUTES[name])
    assert r.error is not None, f"class made: {r!r}"
    refusals = ("not allowed", "not available", "not accessible", "has no attribute")
    assert any(word in r.error for word in refusals), r.error
    # No class K was made, or (made before the refused step) it compares as a str does.
    assert env.execute("print('K' not in dir() or K('a') != 'b')").stdout == "True\n"


def test_the_refusal_says_what_to_do(make_env: Callable[..., REPLEnv]) -> None:
    r = make_env().execute(ROUTES["str-subclass"])
    assert r.error is not None
    assert "class K: a subclass of str cannot define its own __eq__" in r.error
    assert "ordinary class" in r.error


def run(env: REPLEnv, code: str) -> str:
    result = env.execute(code)
    assert result.error is None, result.error
    return result.stdout


def test_an_enum_with_a_str_mixin_works(make_env: Callable[..., REPLEnv]) -> None:
    out = run(make_env(), (
        "from enum import Enum\nclass Color(str, Enum):\n    RED = 'red'\n    GREEN = 'green'\n"
        "print(Color.RED.value, Color('green').name, Color['RED'] is Color.RED, len(Color))\n"
        "print(Color.RED == 'red', {Color.RED: 1}['red'], isinstance(Color.RED, Enum))"
    ))
    assert out == "red GREEN True 2\nTrue 1 True\n"


def test_int_enums_flags_and_auto_work(make_env: Callable[..., REPLEnv]) -> None:
    out = run(make_env(), (
        "import enum\nclass Level(enum.IntEnum):\n    LOW = enum.auto()\n    HIGH = enum.auto()\n"
        "class Perm(enum.Flag):\n    R = 4\n    W = 2\n"
        "print(Level.HIGH + 1, sorted([Level.HIGH, Level.LOW])[0].name, Perm.R in (Perm.R | Perm.W))"
    ))
    assert out == "3 LOW True\n"


def test_the_enum_functional_api_works(make_env: Callable[..., REPLEnv]) -> None:
    out = run(make_env(), (
        "import enum\nShade = enum.Enum('Shade', 'LIGHT DARK')\n"
        "Size = enum.Enum('Size', [('S', 1), ('L', 3)], type=int)\n"
        "print([m.name for m in Shade], Shade.DARK.value, Size.L + 1)"
    ))
    assert out == "['LIGHT', 'DARK'] 2 4\n"


def test_namedtuples_work(make_env: Callable[..., REPLEnv]) -> None:
    out = run(make_env(), (
        "import collections, typing\nPoint = collections.namedtuple('Point', 'x y')\n"
        "class Row(typing.NamedTuple):\n    name: str\n    n: int = 0\n"
        "print(Point(1, 2), Row('a')._asdict(), {Row('a'): 1}[Row('a', 0)], Point(1, 2) == (1, 2))"
    ))
    assert out == "Point(x=1, y=2) {'name': 'a', 'n': 0} 1 True\n"


def test_frozen_dataclasses_are_hashable_keys(make_env: Callable[..., REPLEnv]) -> None:
    out = run(make_env(), (
        "from dataclasses import dataclass\n@dataclass(frozen=True)\nclass Key:\n    a: str\n    b: int\n"
        "seen = {Key('x', 1): 'first'}\nprint(seen[Key('x', 1)], Key('x', 1) == Key('x', 2), Key('x', 1) == ('x', 1))"
    ))
    assert out == "first False False\n"


def test_dataclass_equality_on_ordinary_classes_works(make_env: Callable[..., REPLEnv]) -> None:
    out = run(make_env(), (
        "from dataclasses import dataclass, field\n@dataclass(eq=True, order=True)\nclass Item:\n"
        "    price: float\n    name: str = field(compare=False)\n"
        "print(Item(2, 'a') == Item(2, 'b'), max([Item(1, 'x'), Item(3, 'y')]).name)"
    ))
    assert out == "True y\n"


def test_hand_written_equality_on_ordinary_classes_works(make_env: Callable[..., REPLEnv]) -> None:
    out = run(make_env(), (
        "class Money:\n    def __init__(self, cents):\n        self.cents = cents\n"
        "    def __eq__(self, other):\n        return isinstance(other, Money) and self.cents == other.cents\n"
        "print(Money(5) == Money(5), Money(5) != Money(6))"
    ))
    assert out == "True True\n"


def test_lru_cache_on_a_cells_own_function_works(make_env: Callable[..., REPLEnv]) -> None:
    out = run(make_env(), (
        "import functools\n@functools.lru_cache(maxsize=None)\ndef fib(n):\n"
        "    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
        "print(fib(80), fib.cache_info().hits > 0)\n"
        "@functools.cache\ndef square(x):\n    return x * x\nprint(square(12), square(12))"
    ))
    assert out == "23416728348467685 True\n144 144\n"


def test_sorting_with_key_functions_and_ordering_hooks_works(make_env: Callable[..., REPLEnv]) -> None:
    out = run(make_env(), (
        "rows = [('b', 2), ('a', 3), ('c', 1)]\n"
        "print(sorted(rows, key=lambda r: r[1]), max(rows, key=lambda r: r[0]))\n"
        "class Version(str):\n    def __lt__(self, other):\n"
        "        return [int(p) for p in self.split('.')] < [int(p) for p in other.split('.')]\n"
        "print(sorted([Version('1.10'), Version('1.9')]), {Version('1.9'): 1}['1.9'])"
    ))
    assert out == "[('c', 1), ('b', 2), ('a', 3)] ('c', 1)\n['1.9', '1.10'] 1\n"


def test_a_str_subclass_with_methods_of_its_own_works(make_env: Callable[..., REPLEnv]) -> None:
    out = run(make_env(), (
        "class Doc(str):\n    def words(self):\n        return self.split()\n"
        "d = Doc('a b c')\nprint(d.words(), {d: 1}['a b c'], d == 'a b c')"
    ))
    assert out == "['a', 'b', 'c'] 1 True\n"


def test_host_private_methods_stay_out_of_reach_of_cell_subclasses(
    make_env: Callable[..., REPLEnv],
) -> None:
    env = make_env(timeout=10.0)
    for code in (
        # EnumType._convert_ writes into any module's globals
        "import enum\nclass K(enum.Enum):\n    A = 1\nK._convert_('compile', 're', lambda n: False)",
        # ABCMeta._dump_registry prints to the host's stdout
        "import collections.abc\nclass M(collections.abc.Mapping):\n    pass\nM._dump_registry()",
        "import textwrap\nclass W(textwrap.TextWrapper):\n    pass\nW()._split('a b')",
    ):
        r = env.execute(code)
        assert r.error is not None and "was not defined by code in the REPL" in r.error, r.error
    out = run(env, (
        "class Acc:\n    def __init__(self):\n        self._total = 0\n"
        "    def add(self, n):\n        self._total += n\n        return self\n"
        "import enum\nclass K(enum.Enum):\n    A = 1\n"
        "print(Acc().add(2)._total, K.A._value_, K.A._name_)"
    ))
    assert out == "2 1 A\n"
