"""Task generators of ``rlm bench``: synthetic long-context tasks made offline from a seed.

This module holds the task families, their vocabulary and the length arithmetic
(``parse_length``). It must not hold scoring (``rlm.bench.scorers``) or anything that
talks to a model. Every task is a pure function of (family, length, seed, index): the
same arguments give the same context, query and expected answer on every machine,
with nothing downloaded. Lengths are in tokens, counted as characters / 4; a context
lands within 2% of its target (the contract is 10%).

The families follow two published designs, re-implemented here from their
descriptions (no code or text is taken from them):

- RULER (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your
  Long-Context Language Models?", arXiv:2404.06654, github.com/NVIDIA/RULER):
  ``niah`` (one key/value needle in a haystack, at a depth drawn per task),
  ``niah-multikey`` (the asked key among distractor keys, some of them near misses),
  ``niah-multivalue`` (every value of one key), ``vartrack`` (variable tracking: a
  chain of ``VAR X = VAR Y`` assignments plus a distractor chain; name every variable
  that holds the value) and ``cwe`` (common words extraction: a numbered word list in
  which ten words appear 30 times and every other word 3 times).
- OOLONG (Bertsch et al., 2025, "Oolong: Evaluating Long Context Reasoning and
  Aggregation Capabilities", arXiv:2511.02817): ``oolong`` is a stand-in for its
  ``trec_coarse`` split: one question per line with a date and a user id, each
  question belonging to one of six labels the data does not give, and a question
  about the label distribution (how many of a label, or which label is the most or
  the least common). ``pairs`` follows OOLONG-Pairs from the RLM paper (Zhang,
  Kraska and Khattab, 2025, "Recursive Language Models", arXiv:2512.24601, appendix
  D.1): list every pair of users who both asked a question of one of two labels.

The haystacks are sentences assembled from a small vocabulary, not essays, and the
labelled questions are generated from templates, not drawn from TREC: the tasks keep
the published structure and scoring but are not the published data sets.
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rlm.errors import ConfigError

__all__ = [
    "FAMILIES",
    "LABELS",
    "BenchTask",
    "generate",
    "length_label",
    "parse_length",
]

# Tokens per length unit: the published benchmarks count in powers of two (8k = 2**13).
_UNITS = {"": 1, "k": 1024, "m": 1024 * 1024}
MIN_TOKENS = 1024
MAX_TOKENS = 16 * 1024 * 1024
CHARS_PER_TOKEN = 4

# The six coarse TREC question classes, spelled as the RLM paper's OOLONG-Pairs queries do.
LABELS = (
    "description and abstract concept",
    "entity",
    "human being",
    "numeric value",
    "location",
    "abbreviation",
)


def parse_length(text: str | int) -> int:
    """A context length in tokens from ``8k``, ``128k``, ``1m`` or a plain number.

    ``k`` is 1,024 and ``m`` 1,048,576 tokens, as RULER and the RLM paper count (``8k``
    is 2**13). Raises ``ConfigError`` for anything else, or a length outside 1k-16m.
    """
    raw = str(text).strip().lower()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([km]?)", raw)
    if match is None:
        raise ConfigError(f"length {text!r} is not a token count; write it as 8k, 128k, 1m or 5000")
    tokens = int(float(match.group(1)) * _UNITS[match.group(2)])
    if not MIN_TOKENS <= tokens <= MAX_TOKENS:
        raise ConfigError(f"length {text!r} is {tokens:,} tokens; use 1k to 16m")
    return tokens


def length_label(tokens: int) -> str:
    """The short spelling of a token count: 8192 gives ``8k``, 1048576 gives ``1m``."""
    for unit in ("m", "k"):
        size = _UNITS[unit]
        if tokens % size == 0:
            return f"{tokens // size}{unit}"
    return str(tokens)


@dataclass(frozen=True)
class BenchTask:
    """One generated task: what to ask (``query``), over what (``context``), and the answer.

    ``expected`` is a string, an int or a list of strings, as the family's scorer reads
    it. ``to_json()`` is the line ``rlm bench generate`` writes, in the format ``rlm
    batch`` reads (``id``, ``query``, ``context``) plus ``expected``, ``task``,
    ``length``, ``tokens`` and ``seed``.
    """

    id: str
    task: str
    length: str
    tokens: int
    seed: int
    query: str
    context: str = field(repr=False)
    expected: Any

    def to_json(self) -> dict[str, Any]:
        """The task as a JSON object (one line of a tasks file)."""
        return {
            "id": self.id, "task": self.task, "length": self.length, "tokens": self.tokens,
            "seed": self.seed, "query": self.query, "expected": self.expected,
            "context": self.context,
        }


# -- vocabulary ----------------------------------------------------------------------

_ADJECTIVES = """
amber ancient bitter bold brave bright broad calm clever cold crisp curious damp dark
eager early faint fierce gentle giant golden grand green grey hollow humble icy idle
jolly keen large lazy little lively lone loud lucky merry mild misty modest narrow noble
odd pale patient plain polite proud quick quiet rapid rare rough round rusty silent
silver simple sleepy slow small smooth soft solid spare steady stern still stony strong
sunny swift tall tame tidy tiny vast warm weary wild windy wise young
""".split()

_NOUNS = """
anchor apple arrow badge basket beacon bell bench blanket boat bottle bridge bucket
button cabin camera candle canoe canyon carpet castle cellar chair chimney cloak clock
cloud coin compass cottage crate crown cup desk drum engine fence fiddle flag forest
fountain garden gate glove harbor harp helmet hill island jacket kettle ladder lamp
lantern leaf letter meadow mirror mountain needle orchard oven paddle palace pebble
pencil piano pillow pipe planet pocket pond quilt river rocket saddle sail shelf shovel
signal spoon stable statue stone table teapot tent tower train tunnel valley violin
wagon wall whistle window
""".split()

_VERBS = """
carried crossed painted followed found guarded lifted moved opened passed pulled pushed
reached repaired shared showed sold turned visited watched
""".split()

_PLACES = """
the old harbor|the north field|the town square|the river bank|the mountain road|the
village market|the quiet library|the stone bridge|the garden wall|the railway station|
the busy port|the empty hall|the forest edge|the western shore|the upper valley
""".replace("\n", " ").split("|")
_PLACES = [p.strip() for p in _PLACES]

_PEOPLE = """
farmer sailor teacher baker painter weaver miller carpenter doctor merchant gardener
potter singer tailor builder
""".split()

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _sentence(rng: random.Random) -> str:
    """One haystack sentence: ordinary words, no digits, none of the needle phrases."""
    a, b = rng.sample(_ADJECTIVES, 2)
    n1, n2 = rng.sample(_NOUNS, 2)
    kind = rng.randrange(6)
    if kind == 0:
        return f"The {a} {n1} {rng.choice(_VERBS)} the {b} {n2} near {rng.choice(_PLACES)}."
    if kind == 1:
        return f"A {rng.choice(_PEOPLE)} {rng.choice(_VERBS)} the {a} {n1} before the {n2} was {b}."
    if kind == 2:
        return f"Every {n1} in {rng.choice(_PLACES)} looked {a} and {b} that morning."
    if kind == 3:
        return f"Nobody remembered why the {a} {n1} stood beside the {n2}."
    if kind == 4:
        return f"The {rng.choice(_PEOPLE)} said the {n1} was {a}, but the {n2} seemed {b}."
    return f"Later the {a} {n1} and the {b} {n2} {rng.choice(_VERBS)} {rng.choice(_PLACES)}."


def _haystack(rng: random.Random, chars: int) -> list[str]:
    """Sentences adding up to about ``chars`` characters (joined with one space)."""
    out: list[str] = []
    total = 0
    while total < chars:
        s = _sentence(rng)
        out.append(s)
        total += len(s) + 1
    return out


def _join(sentences: list[str], rng: random.Random) -> str:
    """Sentences as paragraphs of 4 to 8 sentences, one paragraph a line."""
    lines: list[str] = []
    i = 0
    while i < len(sentences):
        step = rng.randrange(4, 9)
        lines.append(" ".join(sentences[i:i + step]))
        i += step
    return "\n".join(lines)


def _key(rng: random.Random, taken: set[str]) -> str:
    while True:
        key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        if key not in taken:
            taken.add(key)
            return key


def _number(rng: random.Random, taken: set[str]) -> str:
    while True:
        value = str(rng.randrange(1_000_000, 10_000_000))
        if value not in taken:
            taken.add(value)
            return value


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _insert(sentences: list[str], items: list[str], rng: random.Random) -> list[str]:
    """``sentences`` with each of ``items`` placed at its own random depth, in order."""
    places = sorted(rng.sample(range(len(sentences) + 1), len(items)))
    out: list[str] = []
    last = 0
    for place, item in zip(places, items, strict=True):
        out.extend(sentences[last:place])
        out.append(item)
        last = place
    out.extend(sentences[last:])
    return out


def _with_needles(rng: random.Random, chars: int, needles: list[str]) -> str:
    room = chars - sum(len(n) + 1 for n in needles)
    return _join(_insert(_haystack(rng, room), needles, rng), rng)


# -- RULER families ------------------------------------------------------------------


def _niah(rng: random.Random, chars: int) -> tuple[str, str, Any]:
    key = _key(rng, set())
    value = _number(rng, set())
    # One needle at a depth drawn for this task, as RULER spreads needles over depths.
    sentences = _haystack(rng, chars - len(_needle(key, value)) - 1)
    depth = rng.random()
    sentences.insert(round(depth * len(sentences)), _needle(key, value))
    query = (f"A special magic number is hidden in the text. What is the special magic "
             f"number for {key}? Answer with the number.")
    return _join(sentences, rng), query, value


def _niah_multikey(rng: random.Random, chars: int) -> tuple[str, str, Any]:
    keys: set[str] = set()
    values: set[str] = set()
    target = _key(rng, keys)
    adjective, noun = target.split("-")
    # Near misses share a word with the asked key; the rest are unrelated keys.
    near = {f"{adjective}-{n}" for n in rng.sample(_NOUNS, 3) if n != noun}
    near |= {f"{a}-{noun}" for a in rng.sample(_ADJECTIVES, 3) if a != adjective}
    distractors = sorted(near - {target})[:4]
    keys.update(distractors)
    distractors += [_key(rng, keys) for _ in range(3)]
    value = _number(rng, values)
    needles = [_needle(target, value)] + [_needle(k, _number(rng, values)) for k in distractors]
    rng.shuffle(needles)
    query = (f"Several special magic numbers are hidden in the text, each for its own key. "
             f"What is the special magic number for {target}? Answer with the number.")
    return _with_needles(rng, chars, needles), query, value


def _niah_multivalue(rng: random.Random, chars: int) -> tuple[str, str, Any]:
    keys: set[str] = set()
    values: set[str] = set()
    target = _key(rng, keys)
    answer = [_number(rng, values) for _ in range(4)]
    needles = [_needle(target, v) for v in answer]
    for _ in range(2):
        other = _key(rng, keys)
        needles.append(_needle(other, _number(rng, values)))
    rng.shuffle(needles)
    query = (f"Several special magic numbers are hidden in the text. What are all the special "
             f"magic numbers for {target}? List every one of them.")
    return _with_needles(rng, chars, needles), query, sorted(answer)


def _variable(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in taken:
            taken.add(name)
            return name


def _vartrack(rng: random.Random, chars: int) -> tuple[str, str, Any]:
    names: set[str] = set()
    numbers: set[str] = set()
    hops = 4  # RULER's default: a chain of five variables
    chains: list[list[str]] = []
    values: list[str] = []
    answer: list[str] = []
    for _ in range(2):  # the asked chain and one distractor chain
        chain = [_variable(rng, names) for _ in range(hops + 1)]
        value = str(rng.randrange(10_000, 100_000))
        while value in numbers:
            value = str(rng.randrange(10_000, 100_000))
        numbers.add(value)
        chains.append([f"VAR {chain[0]} = {value}."]
                      + [f"VAR {chain[i + 1]} = VAR {chain[i]}." for i in range(hops)])
        values.append(value)
        answer = answer or sorted(chain)
    # The two chains interleave at random, each keeping its own order.
    turns = [0] * (hops + 1) + [1] * (hops + 1)
    rng.shuffle(turns)
    statements = [chains[c].pop(0) for c in turns]
    context = _with_needles(rng, chars, statements)
    query = (f"The text hides chains of variable assignments (VAR X = ...). Find every "
             f"variable that is assigned the value {values[0]}, directly or through other "
             f"variables. List their names.")
    return context, query, answer


def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randrange(2, 5)))


def _cwe(rng: random.Random, chars: int) -> tuple[str, str, Any]:
    common_n = 10
    # RULER: the common words 30 times each, the rest 3 times; short lists keep the
    # common words under half of the entries.
    freq_common = max(4, min(30, chars // 12 // (2 * common_n)))
    freq_rare = 3
    words: set[str] = set()
    while len(words) < common_n:
        w = _pseudo_word(rng)
        # No common word inside another, so matching one in an answer cannot match two.
        if not any(w in x or x in w for x in words):
            words.add(w)
    common = sorted(words)
    items = [w for w in common for _ in range(freq_common)]
    # Each line is "N. word\n"; count the characters exactly while adding rare words.
    size = sum(len(w) + 3 + len(str(i)) for i, w in enumerate(items, 1)) - 1
    while size < chars:
        w = _pseudo_word(rng)
        if w in words:
            continue
        words.add(w)
        for _ in range(freq_rare):
            items.append(w)
            size += len(w) + 3 + len(str(len(items)))
    rng.shuffle(items)
    context = "\n".join(f"{i}. {w}" for i, w in enumerate(items, 1))
    query = ("The text is a numbered list of words; some words appear much more often than "
             "others. What are the 10 most common words in the list? List the 10 words.")
    return context, query, common


# -- OOLONG families -----------------------------------------------------------------

_KINDS = ("material", "tool", "fruit", "animal", "plant", "fabric", "metal", "instrument")
_FOUNDED = ("founded", "built", "opened", "first made")
_MADE = ("invented", "designed", "painted", "discovered", "founded")


def _acronym(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_uppercase, k=rng.randrange(3, 5)))


def _question(label: str, rng: random.Random) -> str:
    """A question whose coarse TREC label is ``label``, from templates with random words."""
    a = rng.choice(_ADJECTIVES)
    n1, n2 = rng.sample(_NOUNS, 2)
    form = rng.randrange(3)
    if label == "abbreviation":
        acr = _acronym(rng)
        return (f"What does {acr} stand for?", f"What is the full form of {acr}?",
                f"What is the acronym {acr} short for?")[form]
    if label == "human being":
        return (f"Who {rng.choice(_MADE)} the {a} {n1}?",
                f"Who was the first {rng.choice(_PEOPLE)} to cross the {a} {n1}?",
                f"Who owned the {a} {n1} near {rng.choice(_PLACES)}?")[form]
    if label == "location":
        return (f"Where is the {a} {n1} kept?",
                f"In which city was the {a} {n1} built?",
                f"What country is home to the {a} {n1}?")[form]
    if label == "numeric value":
        return (f"How many {n1}s fit in a {a} {n2}?",
                f"When was the {a} {n1} {rng.choice(_FOUNDED)}?",
                f"How much does a {a} {n1} weigh?")[form]
    if label == "entity":
        kind = rng.choice(_KINDS)
        return (f"What {kind} is used to make a {a} {n1}?",
                f"Which {kind} is shown on the {a} {n1}?",
                f"What kind of {kind} is the {a} {n1}?")[form]
    return (f"Why do {n1}s turn {a} in winter?",  # description and abstract concept
            f"How does a {a} {n1} work?",
            f"What is the difference between a {n1} and a {n2}?")[form]


def _date(rng: random.Random) -> str:
    month = rng.choice(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct",
                        "Nov", "Dec"))
    return f"{month} {rng.randrange(1, 29):02d}, {rng.choice((2022, 2023, 2024))}"


def _record(rng: random.Random, user: str, label: str) -> str:
    return f"Date: {_date(rng)} || User: {user} || Instance: {_question(label, rng)}"


_RECORD_CHARS = 78  # a typical record line, for sizing the user pool
_LABEL_NOTE = (
    "Each question belongs to exactly one of these labels, which the data does not give "
    "(decide from the meaning of the question): " + ", ".join(LABELS) + "."
)


def _records(rng: random.Random, chars: int, users: list[str],
             draw: Callable[[str], str]) -> list[str]:
    """Record lines adding up to about ``chars``; ``draw(user)`` picks each label."""
    lines: list[str] = []
    total = 0
    while total < chars:
        user = rng.choice(users)
        line = _record(rng, user, draw(user))
        lines.append(line)
        total += len(line) + 1
    return lines


def _users(rng: random.Random, count: int) -> list[str]:
    return [str(u) for u in rng.sample(range(10_000, 100_000), count)]


def _oolong(rng: random.Random, chars: int) -> tuple[str, str, Any]:
    users = _users(rng, max(8, chars // (_RECORD_CHARS * 8)))
    kind = rng.choice(("count", "count", "most", "least"))
    while True:
        # A skewed label mix per task, so the most common label differs between tasks.
        weights = [rng.random() + 0.2 for _ in LABELS]
        labels: list[str] = []

        def draw(user: str, _w: list[float] = weights, _out: list[str] = labels) -> str:
            label = rng.choices(LABELS, _w)[0]
            _out.append(label)
            return label

        lines = _records(rng, chars, users, draw)
        counts = Counter(labels)
        ranked = sorted(LABELS, key=lambda lab: counts[lab])
        if kind == "count" or (kind == "most" and counts[ranked[-1]] != counts[ranked[-2]]) or (
            kind == "least" and counts[ranked[0]] != counts[ranked[1]]
        ):
            break  # a tie would leave "the most common label" without one answer
    intro = f"The context lists {len(lines):,} questions, one per line. {_LABEL_NOTE} "
    if kind == "count":
        label = rng.choice(LABELS)
        query = intro + f"How many of the questions have the label '{label}'? Answer with a number."
        expected: Any = counts[label]
    else:
        word = "most" if kind == "most" else "least"
        query = intro + (f"Which label is the {word} common among the questions? Answer with "
                         "the label.")
        expected = ranked[-1] if kind == "most" else ranked[0]
    return "\n".join(lines), query, expected


def _pairs(rng: random.Random, chars: int) -> tuple[str, str, Any]:
    users = _users(rng, max(12, chars // (_RECORD_CHARS * 6)))
    first, second = rng.sample(LABELS, 2)
    rest = [lab for lab in LABELS if lab not in (first, second)]
    # Only a few users ever ask a question of the two labels, so the answer stays a
    # short list at any length while still depending on every line.
    chosen = set(rng.sample(users, rng.randrange(5, 10)))
    has: dict[str, bool] = {}

    def draw(user: str) -> str:
        if user in chosen and (not has.get(user) or rng.random() < 0.25):
            has[user] = True
            return rng.choice((first, second))
        return rng.choice(rest)

    lines = _records(rng, chars, users, draw)
    qualified = sorted(u for u in chosen if has.get(u))
    expected = [f"({a}, {b})" for i, a in enumerate(qualified) for b in qualified[i + 1:]]
    query = (f"The context lists {len(lines):,} questions, one per line, each with a user id. "
             f"{_LABEL_NOTE} List all pairs of user ids (no duplicate pairs, lower id first) "
             f"where both users have at least one question with the label '{first}' or "
             f"'{second}'. Give each pair as (user_id_1, user_id_2), one pair per line.")
    return "\n".join(lines), query, expected


_GENERATORS: dict[str, Callable[[random.Random, int], tuple[str, str, Any]]] = {
    "niah": _niah,
    "niah-multikey": _niah_multikey,
    "niah-multivalue": _niah_multivalue,
    "vartrack": _vartrack,
    "cwe": _cwe,
    "oolong": _oolong,
    "pairs": _pairs,
}

FAMILIES = tuple(_GENERATORS)


def generate(family: str, length: str | int, n: int = 1, seed: int = 0) -> Iterator[BenchTask]:
    """``n`` tasks of ``family`` at ``length`` tokens, made from ``seed``, one at a time.

    Deterministic: the same arguments give the same tasks everywhere. Task ``i`` of seed
    ``s`` has the id ``{family}-{length}-s{s}-{i}``. Raises ``ConfigError`` for an
    unknown family, a bad length or ``n < 1``.
    """
    if family not in _GENERATORS:
        raise ConfigError(f"unknown task {family!r}; choose from {', '.join(FAMILIES)}")
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a whole number >= 1, got {n!r}")
    tokens = parse_length(length)
    label = length_label(tokens)
    make = _GENERATORS[family]
    for index in range(n):
        # A str seed is hashed the same way in every process (PYTHONHASHSEED aside).
        rng = random.Random(f"rlm-bench/{family}/{tokens}/{seed}/{index}")
        context, query, expected = make(rng, tokens * CHARS_PER_TOKEN)
        yield BenchTask(
            id=f"{family}-{label}-s{seed}-{index}", task=family, length=label, tokens=tokens,
            seed=seed, query=query, context=context, expected=expected,
        )
