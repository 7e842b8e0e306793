"""Ordinary programs a model writes: each must run unchanged and print exactly this.

Each program is a list of cells run in order in one fresh env (context is a short
sentence; sub-queries go to the echo fake server, where "ECHO x" answers "x"). The
expected stdout was checked against plain CPython for every program that does not use
the REPL's own names. The suite runs for every sandbox in ``conftest.SANDBOXES``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from rlm import REPLEnv

CONTEXT = "the quick brown fox jumps over the lazy dog; the end"

# name -> (cells, expected stdout of all cells, expected FINAL answer or None)
PROGRAMS: dict[str, tuple[list[str], str, str | None]] = {
    "regex": (
        [
            r"""import re
text = "Order #123 shipped on 2024-05-01; order #456 on 2024-06-10."
print(re.findall(r"#(\d+)", text))
print(re.sub(r"(\d{4})-(\d{2})-(\d{2})", r"\3/\2/\1", text))
m = re.search(r"order #(?P<id>\d+)", text, re.IGNORECASE)
print(m.group("id"), m.span())
print([w for w in re.split(r"[;,.]\s*", text) if w])""",
        ],
        "['123', '456']\nOrder #123 shipped on 01/05/2024; order #456 on 10/06/2024.\n123 (0, 10)\n['Order #123 shipped on 2024-05-01', 'order #456 on 2024-06-10']\n",
        None,
    ),
    "json": (
        [
            """import json
data = {"name": "Ada", "langs": ["en", "fr"], "age": 36, "active": True, "score": None}
s = json.dumps(data, sort_keys=True)
print(s)
back = json.loads(s)
print(back == data, back["langs"][1])
print(json.dumps({"b": 1, "a": [1, 2]}, indent=2, sort_keys=True))""",
        ],
        '{"active": true, "age": 36, "langs": ["en", "fr"], "name": "Ada", "score": null}\nTrue fr\n{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n',
        None,
    ),
    "counter": (
        [
            """from collections import Counter
words = "the cat and the hat and the bat".split()
c = Counter(words)
print(c.most_common(2))
c.update(["cat", "cat"])
print(c["cat"], sum(c.values()), sorted(c))""",
        ],
        "[('the', 3), ('and', 2)]\n3 10 ['and', 'bat', 'cat', 'hat', 'the']\n",
        None,
    ),
    "defaultdict-grouping": (
        [
            """from collections import defaultdict
rows = [("fruit", "apple"), ("veg", "kale"), ("fruit", "pear"), ("veg", "leek"), ("nut", "pecan")]
groups = defaultdict(list)
for kind, name in rows:
    groups[kind].append(name)
for kind in sorted(groups):
    print(kind, groups[kind])
print(dict(groups) == {"fruit": ["apple", "pear"], "veg": ["kale", "leek"], "nut": ["pecan"]})""",
        ],
        "fruit ['apple', 'pear']\nnut ['pecan']\nveg ['kale', 'leek']\nTrue\n",
        None,
    ),
    "classes-inheritance": (
        [
            """class Animal:
    def __init__(self, name):
        self.name = name
    def speak(self):
        return f"{self.name} makes a sound"
    def __eq__(self, other):
        return isinstance(other, Animal) and self.name == other.name

class Dog(Animal):
    def __init__(self, name, tricks=None):
        super().__init__(name)
        self.tricks = list(tricks or [])
    def speak(self):
        return f"{self.name} says woof"
    def learn(self, trick):
        self.tricks.append(trick)
        return self

d = Dog("Rex").learn("sit").learn("roll")
print(d.speak(), d.tricks)
print(Animal("Cat").speak(), isinstance(d, Animal), issubclass(Dog, Animal))
print(Dog("Rex") == Animal("Rex"))""",
        ],
        "Rex says woof ['sit', 'roll']\nCat makes a sound True True\nTrue\n",
        None,
    ),
    "comprehensions": (
        [
            """nums = list(range(10))
squares = [n * n for n in nums if n % 2 == 0]
pairs = {n: n ** 3 for n in nums[:4]}
letters = {ch for ch in "mississippi"}
matrix = [[r * 3 + c for c in range(3)] for r in range(3)]
flat = [x for row in matrix for x in row if x % 4]
print(squares, pairs)
print(sorted(letters), matrix[2], flat)
print(sum(x for x in nums if x > 5), any(x > 8 for x in nums), all(x >= 0 for x in nums))""",
        ],
        "[0, 4, 16, 36, 64] {0: 0, 1: 1, 2: 8, 3: 27}\n['i', 'm', 'p', 's'] [6, 7, 8] [1, 2, 3, 5, 6, 7]\n30 True True\n",
        None,
    ),
    "fstrings": (
        [
            """name, value, ratio = "widget", 1234.5678, 0.4567
print(f"{name!r:>10}|{value:,.2f}|{ratio:.1%}|{42:08b}|{255:#x}")
width = 7
print(f"[{name:^{width}}]", f"{value=:.1f}")
print(f"{'nested ' + name.upper()}")""",
        ],
        "  'widget'|1,234.57|45.7%|00101010|0xff\n[widget ] value=1234.6\nnested WIDGET\n",
        None,
    ),
    "generators": (
        [
            """def fib():
    a, b = 0, 1
    while True:
        yield a
        a, b = b, a + b

def take(n, it):
    out = []
    for x in it:
        if len(out) == n:
            break
        out.append(x)
    return out

def chain(*its):
    for it in its:
        yield from it

def running_total():
    total = 0
    while True:
        x = yield total
        total += x

print(take(10, fib()))
print(list(chain("ab", [1, 2], range(2))))
g = running_total()
next(g)
print(g.send(5), g.send(10))""",
        ],
        "[0, 1, 1, 2, 3, 5, 8, 13, 21, 34]\n['a', 'b', 1, 2, 0, 1]\n5 15\n",
        None,
    ),
    "args-kwargs": (
        [
            """def describe(first, *rest, sep=", ", **options):
    head = sep.join([str(first)] + [str(r) for r in rest])
    opts = " ".join(f"{k}={v}" for k, v in sorted(options.items()))
    return f"{head} | {opts}"

print(describe(1, 2, 3, color="red", size=4))
args = (4, 5)
kwargs = {"sep": "-", "z": 0}
print(describe(*args, **kwargs))
def apply(f, *a, **k):
    return f(*a, **k)
print(apply(max, 3, 9, 2), apply(sorted, [3, 1, 2], reverse=True))""",
        ],
        "1, 2, 3 | color=red size=4\n4-5 | z=0\n9 [3, 2, 1]\n",
        None,
    ),
    "sorting": (
        [
            """from operator import itemgetter, attrgetter
people = [("ann", 31), ("bob", 25), ("cy", 31), ("di", 22)]
print(sorted(people, key=itemgetter(1)))
print(sorted(people, key=lambda p: (-p[1], p[0])))
words = ["banana", "Apple", "cherry", "apple"]
print(sorted(words, key=str.lower), sorted(words, key=len, reverse=True))
class P:
    def __init__(self, n):
        self.n = n
print([p.n for p in sorted([P(3), P(1), P(2)], key=attrgetter("n"))])
print(max(people, key=itemgetter(1)), min(words))""",
        ],
        "[('di', 22), ('bob', 25), ('ann', 31), ('cy', 31)]\n[('ann', 31), ('cy', 31), ('bob', 25), ('di', 22)]\n['Apple', 'apple', 'banana', 'cherry'] ['banana', 'cherry', 'Apple', 'apple']\n[1, 2, 3]\n('ann', 31) Apple\n",
        None,
    ),
    "try-except": (
        [
            """class ParseError(ValueError):
    pass

def parse(s):
    try:
        n = int(s)
    except ValueError as e:
        raise ParseError(f"bad number {s!r}") from e
    else:
        return n
    finally:
        log.append(s)

log = []
results = []
for s in ["1", "x", "3"]:
    try:
        results.append(parse(s))
    except ParseError as e:
        results.append(str(e))
print(results, log)
try:
    {}["missing"]
except KeyError as e:
    print("KeyError", e)
try:
    1 / 0
except (TypeError, ZeroDivisionError) as e:
    print("caught", type(e).__name__, str(e))""",
        ],
        "[1, \"bad number 'x'\", 3] ['1', 'x', '3']\nKeyError 'missing'\ncaught ZeroDivisionError division by zero\n",
        None,
    ),
    "persistence": (
        [
            """items = []
def add(x):
    items.append(x)
    return len(items)""",
            """add("a")
add("b")
total = add("c")""",
            """print(total, items)""",
        ],
        "3 ['a', 'b', 'c']\n",
        None,
    ),
    "counting-augassign": (
        [
            """counts = {}
for ch in "hello world":
    if ch not in counts:
        counts[ch] = 0
    counts[ch] += 1
grid = [[0] * 3 for _ in range(2)]
grid[1][2] += 5
grid[0][0] -= 1
n = 10
n //= 3
n **= 2
print(sorted(counts.items()), grid, n)""",
        ],
        "[(' ', 1), ('d', 1), ('e', 1), ('h', 1), ('l', 3), ('o', 2), ('r', 1), ('w', 1)] [[-1, 0, 0], [0, 0, 5]] 9\n",
        None,
    ),
    "dataclasses": (
        [
            """from dataclasses import dataclass, field, asdict, replace

@dataclass
class Item:
    name: str
    price: float
    tags: list = field(default_factory=list)

@dataclass(frozen=True, order=True)
class Point:
    x: int
    y: int = 0

a = Item("pen", 1.5)
a.tags.append("office")
print(a, asdict(a))
print(replace(a, price=2.0).price, sorted([Point(2, 1), Point(1, 5), Point(1, 2)]))
try:
    Point(1).x = 3
except Exception as e:
    print(type(e).__name__)""",
        ],
        "Item(name='pen', price=1.5, tags=['office']) {'name': 'pen', 'price': 1.5, 'tags': ['office']}\n2.0 [Point(x=1, y=2), Point(x=1, y=5), Point(x=2, y=1)]\nFrozenInstanceError\n",
        None,
    ),
    "await-async": (
        [
            """r = await llm_query_async("ECHO hello")
print(r)
async def ask(p):
    return (await llm_query_async(f"ECHO {p}")).upper()
print(await ask("quiet"))""",
        ],
        "hello\nQUIET\n",
        None,
    ),
    "await-batch-async": (
        [
            """prompts = [f"ECHO {i}" for i in range(5)]
answers = await llm_query_batch_async(prompts)
print(answers, sum(int(a) for a in answers))""",
        ],
        "['0', '1', '2', '3', '4'] 10\n",
        None,
    ),
    "string-methods": (
        [
            r"""s = "  Hello, World!  "
print(s.strip(), s.lower().strip(), s.replace("World", "There").strip())
print("-".join(["a", "b", "c"]), "a,b,,c".split(","), "x".center(5, "*"), "7".zfill(3))
print("title case here".title(), "CamelCase".swapcase(), "abc".startswith(("x", "a")))
print("one two  three".split(), "line1\nline2".splitlines(), "k=v=w".partition("="))""",
        ],
        "Hello, World! hello, world! Hello, There!\na-b-c ['a', 'b', '', 'c'] **x** 007\nTitle Case Here cAMELcASE True\n['one', 'two', 'three'] ['line1', 'line2'] ('k', '=', 'v=w')\n",
        None,
    ),
    "slicing": (
        [
            """s = "abcdefghij"
lst = list(range(10))
print(s[2:5], s[::-1], s[-3:], s[::3])
print(lst[1:8:2], lst[-2:], lst[:-7])
lst[2:4] = ["x", "y", "z"]
del lst[0]
print(lst, len(lst))""",
        ],
        "cde jihgfedcba hij adgj\n[1, 3, 5, 7] [8, 9] [0, 1, 2]\n[1, 'x', 'y', 'z', 4, 5, 6, 7, 8, 9] 10\n",
        None,
    ),
    "enumerate-zip": (
        [
            """names = ["a", "b", "c"]
scores = [90, 85, 77]
for i, (n, s) in enumerate(zip(names, scores), start=1):
    print(i, n, s)
print(dict(zip(names, scores)), list(zip(*[(1, 2), (3, 4)])))
print(list(enumerate("xy")))""",
        ],
        "1 a 90\n2 b 85\n3 c 77\n{'a': 90, 'b': 85, 'c': 77} [(1, 3), (2, 4)]\n[(0, 'x'), (1, 'y')]\n",
        None,
    ),
    "closures-nonlocal": (
        [
            """def make_counter(start=0):
    count = start
    def inc(step=1):
        nonlocal count
        count += step
        return count
    return inc

c1 = make_counter()
c2 = make_counter(10)
c1(); c1()
print(c1(), c2(5))
def compose(*fs):
    def composed(x):
        for f in reversed(fs):
            x = f(x)
        return x
    return composed
print(compose(str, lambda x: x * 2, abs)(-21))""",
        ],
        "3 15\n42\n",
        None,
    ),
    "lambdas-map-filter": (
        [
            """nums = [5, -3, 8, 0, -1]
print(list(map(lambda x: x * 2, nums)), list(filter(None, nums)), list(filter(lambda x: x > 0, nums)))
ops = {"add": lambda a, b: a + b, "mul": lambda a, b: a * b}
print({k: f(3, 4) for k, f in ops.items()})
print(sorted(nums, key=abs))""",
        ],
        "[10, -6, 16, 0, -2] [5, -3, 8, -1] [5, 8]\n{'add': 7, 'mul': 12}\n[0, -1, -3, 5, 8]\n",
        None,
    ),
    "math-statistics": (
        [
            """import math, statistics
data = [2, 4, 4, 4, 5, 5, 7, 9]
print(statistics.mean(data), statistics.median(data), statistics.mode(data), statistics.pstdev(data))
print(math.sqrt(16), math.floor(2.7), math.ceil(2.1), math.gcd(12, 18), round(math.pi, 4), math.comb(5, 2))
print(math.isclose(0.1 + 0.2, 0.3), divmod(17, 5), pow(2, 10), abs(-3.5), round(2.675, 2))""",
        ],
        "5 4.5 4 2.0\n4.0 2 3 6 3.1416 10\nTrue (3, 2) 1024 3.5 2.67\n",
        None,
    ),
    "itertools": (
        [
            """import itertools
print(list(itertools.islice(itertools.count(10, 5), 4)))
print(list(itertools.chain([1, 2], "ab")), list(itertools.combinations("abc", 2)))
data = sorted(["apple", "avocado", "banana", "blueberry", "cherry"])
print({k: list(g) for k, g in itertools.groupby(data, key=lambda w: w[0])})
print(list(itertools.accumulate([1, 2, 3, 4])), list(itertools.product([0, 1], repeat=2)))
print(list(itertools.islice(itertools.cycle("xy"), 5)), list(itertools.repeat(7, 3)))""",
        ],
        "[10, 15, 20, 25]\n[1, 2, 'a', 'b'] [('a', 'b'), ('a', 'c'), ('b', 'c')]\n{'a': ['apple', 'avocado'], 'b': ['banana', 'blueberry'], 'c': ['cherry']}\n[1, 3, 6, 10] [(0, 0), (0, 1), (1, 0), (1, 1)]\n['x', 'y', 'x', 'y', 'x'] [7, 7, 7]\n",
        None,
    ),
    "functools": (
        [
            '''import functools, operator
print(functools.reduce(operator.mul, range(1, 6)), functools.reduce(lambda a, b: a + b, [], 0))
@functools.lru_cache(maxsize=None)
def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)
print(fib(80), fib.cache_info().hits > 0)
base2 = functools.partial(int, base=2)
print(base2("1011"))
def deco(f):
    @functools.wraps(f)
    def wrapper(*a):
        return f(*a) * 10
    return wrapper
@deco
def one():
    """Returns one."""
    return 1
print(one(), one.__name__, one.__doc__)''',
        ],
        "120 0\n23416728348467685 True\n11\n10 one Returns one.\n",
        None,
    ),
    "heapq-bisect": (
        [
            """import heapq, bisect
h = []
for x in [5, 1, 8, 3, 9, 2]:
    heapq.heappush(h, x)
print([heapq.heappop(h) for _ in range(3)], heapq.nlargest(2, [5, 1, 8, 3]))
a = [1, 3, 3, 7]
bisect.insort(a, 4)
print(a, bisect.bisect_left(a, 3), bisect.bisect_right(a, 3))""",
        ],
        "[1, 2, 3] [8, 5]\n[1, 3, 3, 4, 7] 1 3\n",
        None,
    ),
    "textwrap": (
        [
            '''import textwrap
text = "The quick brown fox jumps over the lazy dog and keeps running far away."
print(textwrap.fill(text, width=30))
print(textwrap.shorten(text, width=25, placeholder="..."))
print(textwrap.dedent("""
    indented
      more
""").strip())''',
        ],
        "The quick brown fox jumps over\nthe lazy dog and keeps running\nfar away.\nThe quick brown fox...\nindented\n  more\n",
        None,
    ),
    "datetime": (
        [
            """from datetime import date, datetime, timedelta
d = date(2024, 2, 28) + timedelta(days=2)
print(d.isoformat(), d.strftime("%A %d %B"), (date(2024, 12, 25) - date(2024, 1, 1)).days)
dt = datetime.strptime("2024-03-05 14:30", "%Y-%m-%d %H:%M")
print(dt + timedelta(hours=10), dt.weekday(), dt.replace(year=2020).year)""",
        ],
        "2024-03-01 Friday 01 March 359\n2024-03-06 00:30:00 1 2020\n",
        None,
    ),
    "attributes-properties": (
        [
            """class Account:
    rate = 0.05
    def __init__(self, owner, balance=0):
        self.owner = owner
        self.balance = balance
        self.history = []
    @property
    def rich(self):
        return self.balance > 100
    @classmethod
    def empty(cls, owner):
        return cls(owner)
    @staticmethod
    def fee(amount):
        return round(amount * 0.01, 2)
    def deposit(self, amount):
        self.balance += amount
        self.history += [amount]
        return self

acct = Account.empty("zoe").deposit(80).deposit(50)
acct.nickname = "z"
print(acct.balance, acct.history, acct.rich, Account.fee(250), acct.nickname)
Account.rate += 0.01
print(round(Account.rate, 2), hasattr(acct, "nickname"), getattr(acct, "missing", "default"))
setattr(acct, "owner", "zed")
print(acct.owner)""",
        ],
        "130 [80, 50] True 2.5 z\n0.06 True default\nzed\n",
        None,
    ),
    "context-chunks": (
        [
            """chunks = [context[i:i + 10] for i in range(0, len(context), 10)]
print(len(context), len(chunks), chunks[0], repr(chunks[-1]))
print(context.count("e"), context.split()[:3])""",
        ],
        "52 6 the quick  'nd'\n5 ['the', 'quick', 'brown']\n",
        None,
    ),
    "batch-over-chunks-final": (
        [
            """answers = llm_query_batch([f"ECHO {c}" for c in ["x", "y", "z"]])
print(answers)
FINAL(" ".join(answers))""",
        ],
        "['x', 'y', 'z']\n",
        "x y z",
    ),
    "walrus-while-else": (
        [
            """data = [3, 8, 1, 9, 4]
i = 0
while i < len(data):
    if (v := data[i]) > 8:
        print("found", v, "at", i)
        break
    i += 1
else:
    print("none")
for x in data:
    if x > 100:
        break
else:
    print("no big values")
print([y for x in data if (y := x * 2) > 10])""",
        ],
        "found 9 at 3\nno big values\n[16, 18]\n",
        None,
    ),
    "typing-hints": (
        [
            """from typing import Optional, List, Dict, Tuple, Any, Union
def head(xs: List[int], n: Optional[int] = None) -> List[int]:
    return xs[: n or 1]
def merge(a: Dict[str, int], b: Dict[str, int]) -> Dict[str, int]:
    return {**a, **b}
pair: Tuple[int, str] = (1, "a")
value: Union[int, str] = "s"
print(head([5, 6, 7]), head([5, 6, 7], 2), merge({"a": 1}, {"b": 2}), pair, value)
def norm(x: list[int] | None) -> dict[str, Any]:
    return {"n": len(x or [])}
print(norm(None), norm([1, 2]))""",
        ],
        "[5] [5, 6] {'a': 1, 'b': 2} (1, 'a') s\n{'n': 0} {'n': 2}\n",
        None,
    ),
    "str-format": (
        [
            """row = {"name": "Ann", "qty": 3, "price": 2.5}
print("{name} bought {qty} at ${price:.2f}".format(**row))
print("{0[name]} / {1}".format(row, "x"), "{:>6}|{:<4}|".format("ab", "c"))
print("{name}: {qty}".format_map(row), str.format("{} + {}", 1, 2))
class Box:
    def __init__(self):
        self.size = 7
print("size={0.size}".format(Box()), "%s has %d" % ("box", 7))""",
        ],
        "Ann bought 3 at $2.50\nAnn / x     ab|c   |\nAnn: 3 1 + 2\nsize=7 box has 7\n",
        None,
    ),
    "isinstance-types": (
        [
            """values = [1, "a", [2], {"k": 3}, (4,), None, 2.5, {5}]
kinds = []
for v in values:
    if isinstance(v, (list, tuple)):
        kinds.append("seq")
    elif isinstance(v, dict):
        kinds.append("map")
    elif type(v) == str:
        kinds.append("str")
    elif type(v) is int:
        kinds.append("int")
    else:
        kinds.append(type(v).__name__)
print(kinds)
print(type([]) is list, type({}) == dict, isinstance(True, int), list is not dict)""",
        ],
        "['int', 'str', 'seq', 'map', 'seq', 'NoneType', 'float', 'set']\nTrue True True True\n",
        None,
    ),
    "hashlib-base64": (
        [
            """import hashlib, base64
print(hashlib.sha256(b"abc").hexdigest()[:16], hashlib.md5("x".encode()).hexdigest())
enc = base64.b64encode("héllo".encode("utf-8"))
print(enc, base64.b64decode(enc).decode("utf-8"))""",
        ],
        "ba7816bf8f01cfea 9dd4e461268c8034f5c8564e155c67a6\nb'aMOpbGxv' héllo\n",
        None,
    ),
    "decimal-fractions": (
        [
            """from decimal import Decimal, getcontext
from fractions import Fraction
print(Decimal("0.1") + Decimal("0.2"), Decimal(1) / Decimal(8))
getcontext().prec = 6
print(Decimal(1) / Decimal(7))
print(Fraction(1, 3) + Fraction(1, 6), Fraction("0.75"), float(Fraction(3, 8)))""",
        ],
        "0.3 0.125\n0.142857\n1/2 3/4 0.375\n",
        None,
    ),
    "subclass-builtins": (
        [
            """class Stack(list):
    def push(self, x):
        self.append(x)
        return self
    def peek(self):
        return self[-1]

class Registry(dict):
    def register(self, name):
        def deco(f):
            self[name] = f
            return f
        return deco

s = Stack([1]).push(2).push(3)
print(s, s.peek(), len(s), isinstance(s, list))
reg = Registry()
@reg.register("double")
def double(x):
    return 2 * x
print(reg["double"](21), list(reg))""",
        ],
        "[1, 2, 3] 3 3 True\n42 ['double']\n",
        None,
    ),
    "namedtuple-deque": (
        [
            """from collections import namedtuple, deque, OrderedDict, ChainMap
Point = namedtuple("Point", ["x", "y"])
p = Point(1, 2)
print(p, p.x + p.y, p._asdict(), p._replace(y=5), Point._fields)
dq = deque([1, 2, 3], maxlen=4)
dq.appendleft(0)
dq.append(4)
dq.rotate(1)
print(list(dq))
od = OrderedDict(a=1, b=2)
od.move_to_end("a")
print(list(od), dict(ChainMap({"x": 1}, {"x": 2, "y": 3})))""",
        ],
        "Point(x=1, y=2) 3 {'x': 1, 'y': 2} Point(x=1, y=5) ('x', 'y')\n[4, 1, 2, 3]\n['b', 'a'] {'x': 1, 'y': 3}\n",
        None,
    ),
    "deepcopy-sets": (
        [
            """import copy
orig = {"a": [1, 2], "b": {"c": 3}}
clone = copy.deepcopy(orig)
clone["a"].append(99)
print(orig, clone["a"])
a, b = {1, 2, 3}, {2, 3, 4}
print(a | b, a & b, a - b, a ^ b, a <= {1, 2, 3, 4})""",
        ],
        "{'a': [1, 2], 'b': {'c': 3}} [1, 2, 99]\n{1, 2, 3, 4} {2, 3} {1} {1, 4} True\n",
        None,
    ),
    "async-for-generator": (
        [
            """async def numbers(n):
    for i in range(n):
        yield i * i

async def main():
    total = 0
    async for v in numbers(5):
        total += v
    squares = [v async for v in numbers(4)]
    return total, squares

print(await main())""",
        ],
        "(30, [0, 1, 4, 9])\n",
        None,
    ),
    "final-var": (
        [
            """summary = {"answer": 42}
result_text = f"The answer is {summary['answer']}"
FINAL_VAR("result_text")""",
        ],
        "",
        "The answer is 42",
    ),
    "print-sep-end": (
        [
            r"""print("a", "b", "c", sep="-", end="!\n")
print(1, 2, sep="")
print("no newline", end="")
print()
print(*[1, 2, 3])""",
        ],
        "a-b-c!\n12\nno newline\n1 2 3\n",
        None,
    ),
    "echo-expression": (
        [
            """x = [1, 2, 3]
x""",
            """{"k": (1, 2)}""",
            """None""",
            '''"text"''',
        ],
        "[1, 2, 3]\n{'k': (1, 2)}\n'text'\n",
        None,
    ),
    "unicode-difflib-csv": (
        [
            r"""import unicodedata, difflib, csv
print(unicodedata.normalize("NFKD", "é") == "e\u0301", unicodedata.name("λ"))
print(difflib.get_close_matches("appel", ["ape", "apple", "peach"]))
rows = list(csv.reader('a,b\n1,"x, y"\n'.splitlines()))
print(rows, [r["b"] for r in csv.DictReader("a,b\n1,2\n3,4".splitlines())])""",
        ],
        "True GREEK SMALL LETTER LAMDA\n['apple', 'ape']\n[['a', 'b'], ['1', 'x, y']] ['2', '4']\n",
        None,
    ),
    "random-seeded": (
        [
            """import random
random.seed(42)
a = [random.randint(1, 100) for _ in range(3)]
random.seed(42)
b = [random.randint(1, 100) for _ in range(3)]
print(a == b, len(a), all(1 <= x <= 100 for x in a))
items = list(range(10))
random.shuffle(items)
print(sorted(items) == list(range(10)), random.choice(["only"]))""",
        ],
        "True 3 True\nTrue only\n",
        None,
    ),
    "pprint-pformat": (
        [
            """import pprint
data = {"z": [1, 2, 3], "a": {"nested": True}}
print(pprint.pformat(data))
pprint.pprint(list(range(3)))""",
        ],
        "{'a': {'nested': True}, 'z': [1, 2, 3]}\n[0, 1, 2]\n",
        None,
    ),
    "private-attributes": (
        [
            """class Cache:
    def __init__(self):
        self._store = {}
        self._hits = 0
    def get(self, key, compute):
        if key in self._store:
            self._hits += 1
        else:
            self._store[key] = compute(key)
        return self._store[key]
    @property
    def hits(self):
        return self._hits

c = Cache()
print([c.get(k, lambda k: k * 2) for k in [1, 2, 1, 1]], c.hits, c._hits, type(c).__name__)
try:
    raise ValueError("boom")
except ValueError as e:
    print(f"{type(e).__name__}: {e}")""",
        ],
        "[2, 4, 2, 2] 2 2 Cache\nValueError: boom\n",
        None,
    ),
    "match-statement": (
        [
            """from dataclasses import dataclass

@dataclass
class Point:
    x: int
    y: int

def describe(item):
    match item:
        case {"type": "point", "x": x, **rest}:
            return f"point dict x={x} rest={rest}"
        case Point(x=0, y=y):
            return f"on the y axis at {y}"
        case Point(x, y) if x == y:
            return f"diagonal {x}"
        case [first, *others]:
            return f"list starting {first} with {len(others)} more"
        case str() | bytes() as text:
            return f"text {text!r}"
        case None:
            return "nothing"
        case _:
            return "something else"

for item in [{"type": "point", "x": 1, "z": 2}, Point(0, 5), Point(3, 3), [1, 2, 3], "hi", None, 4.5]:
    print(describe(item))""",
        ],
        "point dict x=1 rest={'z': 2}\non the y axis at 5\ndiagonal 3\nlist starting 1 with 2 more\ntext 'hi'\nnothing\nsomething else\n",
        None,
    ),
    "match-class-patterns": (
        [
            """import datetime, re
from dataclasses import dataclass

@dataclass
class Span:
    start: int
    end: int

def kind(x):
    match x:
        case Span(0, end):
            return f"prefix to {end}"
        case Span(start=s, end=e) if e - s > 5:
            return f"long {s}-{e}"
        case int(n) | float(n):
            return f"number {n}"
        case list([a, b]):
            return f"pair {a},{b}"
        case dict(d) if "id" in d:
            return f"record {d['id']}"
        case datetime.date(year=y, month=m):
            return f"date {y}/{m}"
        case re.Match():
            return "a match"
        case tuple() | set():
            return "collection"
        case _:
            return "other"

for x in [Span(0, 3), Span(2, 9), Span(1, 2), 7, 2.5, [1, 2], {"id": 4}, datetime.date(2024, 5, 1),
          re.match("a", "a"), (1,), {1}, "s"]:
    print(kind(x))""",
        ],
        "prefix to 3\nlong 2-9\nother\nnumber 7\nnumber 2.5\npair 1,2\nrecord 4\ndate 2024/5\na match\ncollection\ncollection\nother\n",
        None,
    ),
    "abc-protocol-namedtuple-classes": (
        [
            """import collections.abc, typing

class Bag(collections.abc.Container):
    def __init__(self, items):
        self.items = list(items)
    def __contains__(self, item):
        return item in self.items

class Named(typing.Protocol):
    name: str

class Pair(typing.NamedTuple):
    left: int
    right: int = 0

class Movie(typing.TypedDict):
    title: str

class Node(typing.Generic[typing.TypeVar("T")]):
    pass

class MyList(list):
    def total(self):
        return sum(self)

print(isinstance(Bag([1, 2]), collections.abc.Container), 2 in Bag([1, 2]), Pair(1), Pair(2, 3)._asdict())
print(Movie(title="x"), type(Node()).__name__, MyList([1, 2, 3]).total())
print(isinstance(b"", collections.abc.Mapping), isinstance({}, collections.abc.Mapping))""",
        ],
        "True True Pair(left=1, right=0) {'left': 2, 'right': 3}\n{'title': 'x'} Node 6\nFalse True\n",
        None,
    ),
    "async-queries-and-iterators": (
        [
            """import itertools
first = await llm_query_async("ECHO one")
both = await llm_query_batch_async(["ECHO a", "ECHO b"])
pending = llm_query_async("ECHO later")
print(first, both, await pending)
print(list(itertools.islice(itertools.count(3), 3)), list(iter([5, 6, 0, 7].pop, 0)))
async def gen():
    yield 1
    yield 2
g = gen()
print(await anext(g), await anext(g), await anext(g, "done"))""",
        ],
        "one ['a', 'b'] later\n[3, 4, 5] [7]\n1 2 done\n",
        None,
    ),
}


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_benign_program_runs_unchanged(name: str, make_env: Callable[..., REPLEnv]) -> None:
    cells, expected, final = PROGRAMS[name]
    env = make_env(context=CONTEXT, timeout=30.0)
    stdout = ""
    answer = None
    for code in cells:
        r = env.execute(code)
        assert r.error is None, f"cell failed:\n{code}\n{r.error}"
        stdout += r.stdout
        if r.final is not None:
            answer = r.final
    assert stdout == expected
    assert answer == final


def test_benign_suite_is_large_enough() -> None:
    assert len(PROGRAMS) >= 30
