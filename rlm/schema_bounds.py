"""What checking a value against a schema may cost, and where that work runs.

Schemas and values both come from untrusted places (REPL code, a server's clients, a
model's reply), so their checking is bounded in three ways:

- ``cost_problem``: when a JSON Schema is accepted, an analysis of where its subschemas
  apply refuses one that applies some part of itself without going into the value (a
  ``$ref`` loop, which never ends) or that makes a single value node cost more than
  ``MAX_APPLICATIONS`` subschema checks (``allOf: [{$ref: "#"}, {$ref: "#"}]`` doubles
  per level of the value; a chain of such ``$defs`` doubles per link);
- ``bounded_validator``: a validator class whose every keyword checks a deadline, and
  whose ``uniqueItems`` is linear instead of quadratic, so what the analysis cannot see
  still stops; ``deeper_than`` caps a value's nesting before it is checked;
- ``off_loop``: validation runs in a small thread pool, never on an event loop. A thread
  cannot be killed: the deadline is what bounds it.

Nothing here knows what a schema means for prompts or how issues read (``rlm.schema``),
nor which keywords a sub-query schema may use (``rlm.structured``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import unquote

__all__ = [
    "MAX_APPLICATIONS",
    "MAX_VALUE_DEPTH",
    "OverBudget",
    "bounded_validator",
    "cost_problem",
    "deadline",
    "deeper_than",
    "off_loop",
]

T = TypeVar("T")

# Subschema checks one node of a value may cost. Real schemas apply a handful of
# subschemas to each node (a property's schema, a $ref, the branches of an anyOf).
MAX_APPLICATIONS = 1_000
# Deepest value checked (and deepest value the analysis follows a schema into). JSON
# answers nested deeper than this are not answers people ask for.
MAX_VALUE_DEPTH = 64
# Partial states the analysis follows per level of a value (the costliest ones).
_STATES_KEPT = 8
# Threads that validate: the work holds the GIL, so more threads would not finish sooner.
_VALIDATION_THREADS = 2

Path = tuple[Any, ...]


class OverBudget(Exception):
    """Raised inside a validation whose deadline has passed."""


# -- acceptance: what a schema can cost ------------------------------------------------


class _Refused(Exception):
    pass


def _at(root: Any, path: Path) -> Any:
    node = root
    for part in path:
        node = node[part]
    return node


def _resolve(root: Any, ref: str) -> Path | None:
    """The location a local ``#/json/pointer`` reference names, or None."""
    if not ref.startswith("#"):
        return None
    fragment = unquote(ref[1:])
    if not fragment:
        return ()
    if not fragment.startswith("/"):
        return None  # an anchor name: not followed (sub-query schemas may not use them)
    path: list[Any] = []
    node = root
    for raw in fragment[1:].split("/"):
        part: Any = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return None
            part = int(part)
        elif not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
        path.append(part)
    return tuple(path)


_IN_PLACE_ONE = ("not", "if", "then", "else")
_IN_PLACE_LIST = ("allOf", "anyOf", "oneOf")
_IN_PLACE_MAP = ("dependentSchemas", "dependencies")
# Apply to some or all children of a value; "*" stands for any child.
_DOWN_ANY = ("additionalItems", "unevaluatedItems", "contains", "additionalProperties",
             "unevaluatedProperties", "propertyNames")


class _Graph:
    """Where each subschema of a schema applies: at the same value node (``same``) or at
    a child of it (``down``, labelled by which child)."""

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self._edges: dict[Path, tuple[list[Path], list[tuple[Any, Path]]]] = {}
        self._closure: dict[Path, dict[Path, int]] = {}
        self._sizes: dict[Path, int] = {}

    def edges(self, path: Path) -> tuple[list[Path], list[tuple[Any, Path]]]:
        found = self._edges.get(path)
        if found is None:
            found = self._edges[path] = self._build(path)
        return found

    def _build(self, path: Path) -> tuple[list[Path], list[tuple[Any, Path]]]:
        node = _at(self.root, path)
        same: list[Path] = []
        down: list[tuple[Any, Path]] = []
        if not isinstance(node, dict):
            return same, down
        for key in _IN_PLACE_ONE:
            if isinstance(node.get(key), dict):
                same.append((*path, key))
        for key in _IN_PLACE_LIST:
            if isinstance(node.get(key), list):
                same.extend((*path, key, i) for i, sub in enumerate(node[key]) if isinstance(sub, dict))
        for key in _IN_PLACE_MAP:
            if isinstance(node.get(key), dict):
                same.extend((*path, key, k) for k, sub in node[key].items() if isinstance(sub, dict))
        ref = node.get("$ref")
        if isinstance(ref, str):
            target = _resolve(self.root, ref)
            if target is not None and isinstance(_at(self.root, target), dict):
                same.append(target)
        items = node.get("items")
        if isinstance(items, dict):
            down.append(("*", (*path, "items")))
        elif isinstance(items, list):
            down.extend((("#", i), (*path, "items", i)) for i, sub in enumerate(items) if isinstance(sub, dict))
        if isinstance(node.get("prefixItems"), list):
            down.extend((("#", i), (*path, "prefixItems", i))
                        for i, sub in enumerate(node["prefixItems"]) if isinstance(sub, dict))
        for key in _DOWN_ANY:
            if isinstance(node.get(key), dict):
                down.append(("*", (*path, key)))
        if isinstance(node.get("properties"), dict):
            down.extend(((".", name), (*path, "properties", name))
                        for name, sub in node["properties"].items() if isinstance(sub, dict))
        if isinstance(node.get("patternProperties"), dict):
            down.extend(("*", (*path, "patternProperties", k))
                        for k, sub in node["patternProperties"].items() if isinstance(sub, dict))
        return same, down

    def closure(self, start: Path) -> dict[Path, int]:
        """Every subschema applied at the value node where ``start`` applies, with how many
        times (iterative: a chain of thousands of references must not hit the recursion
        limit)."""
        if start in self._closure:
            return self._closure[start]
        on_stack = {start}
        stack: list[tuple[Path, Iterator[Path]]] = [(start, iter(self.edges(start)[0]))]
        while stack:
            path, targets = stack[-1]
            target = next(targets, None)
            if target is None:
                stack.pop()
                on_stack.discard(path)
                total = {path: 1}
                for sub in self.edges(path)[0]:
                    for key, count in self._closure[sub].items():
                        total[key] = total.get(key, 0) + count
                if sum(total.values()) > MAX_APPLICATIONS:
                    raise _Refused(_too_costly())
                self._closure[path] = total
            elif target in on_stack:
                raise _Refused(
                    "it refers back to itself without going into the value (a $ref loop "
                    "through allOf/anyOf/oneOf/not/if, which never ends)"
                )
            elif target not in self._closure:
                on_stack.add(target)
                stack.append((target, iter(self.edges(target)[0])))
        return self._closure[start]

    def size(self, path: Path) -> int:
        """How many subschemas apply at a value node where ``path`` applies."""
        size = self._sizes.get(path)
        if size is None:
            size = self._sizes[path] = sum(self.closure(path).values())
        return size


def _too_costly() -> str:
    return (
        f"it applies its parts more than {MAX_APPLICATIONS:,} times to one part of a value "
        "(e.g. a $ref to itself twice in an allOf/anyOf/oneOf doubles the work at every "
        "level), which takes exponential time; write each part once"
    )


def _merge(into: dict[Path, int], add: Mapping[Path, int], times: int = 1) -> None:
    for key, count in add.items():
        into[key] = into.get(key, 0) + count * times


def cost_problem(schema: dict[str, Any]) -> str | None:
    """Why checking values against this JSON Schema could cost exponential time or never
    end, or None when it cannot.

    The schema is followed into an imagined value, level by level down to
    ``MAX_VALUE_DEPTH``: at each level, the subschemas that apply to one node of the
    value are counted (with ``$ref``s followed), for the costliest children. A count over
    ``MAX_APPLICATIONS``, or a reference loop that stays on one node, is the problem.
    Recursive schemas that go one level into the value per reference (a tree) are fine.
    """
    graph = _Graph(schema)
    frontier: list[dict[Path, int]] = [{(): 1}]
    try:
        for _ in range(MAX_VALUE_DEPTH + 1):
            children: dict[frozenset[tuple[Path, int]], dict[Path, int]] = {}
            for state in frontier:
                # Counted before anything is merged: a schema that explodes is refused
                # at the cost of its counts, not of its explosion.
                if sum(times * graph.size(path) for path, times in state.items()) > MAX_APPLICATIONS:
                    raise _Refused(_too_costly())
                applied: dict[Path, int] = {}
                for path, times in state.items():
                    _merge(applied, graph.closure(path), times)
                buckets: dict[Any, dict[Path, int]] = {}
                for path, times in applied.items():
                    for label, target in graph.edges(path)[1]:
                        bucket = buckets.setdefault(label, {})
                        bucket[target] = bucket.get(target, 0) + times
                anywhere = buckets.pop("*", {})
                named = sorted(buckets.values(), key=lambda b: -sum(b.values()))[:_STATES_KEPT]
                for bucket in named or [{}]:
                    child = dict(bucket)
                    _merge(child, anywhere)
                    if child:
                        children[frozenset(child.items())] = child
            kept = sorted(children.values(), key=lambda s: -sum(s.values()))[:_STATES_KEPT]
            if kept == frontier:
                return None  # the same states again: deeper levels cost the same
            frontier = kept
            if not frontier:
                return None
    except _Refused as exc:
        return str(exc)
    return None


# -- validation: a deadline and a depth cap --------------------------------------------

_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("rlm_validation_deadline",
                                                                         default=None)


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Validation by a ``bounded_validator`` in this block raises ``OverBudget`` once
    ``seconds`` have passed."""
    token = _DEADLINE.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def _check_deadline() -> None:
    limit = _DEADLINE.get()
    if limit is not None and time.monotonic() > limit:
        raise OverBudget


def deeper_than(value: Any, depth: int = MAX_VALUE_DEPTH) -> bool:
    """True when lists/dicts in ``value`` nest deeper than ``depth`` (a value that contains
    itself does); walks iteratively, checking the deadline as it goes."""
    stack: list[Iterator[Any]] = [iter((value,))]
    steps = 0
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
            continue
        steps += 1
        if not steps % 4096:
            _check_deadline()
        if isinstance(item, dict):
            children: Iterator[Any] = iter(item.values())
        elif isinstance(item, list | tuple):
            children = iter(item)
        else:
            continue
        if len(stack) > depth:
            if next(children, _END) is not _END:
                return True
            continue
        stack.append(children)
    return False


_END = object()


def _frozen(value: Any) -> Any:
    """A hashable stand-in equal for values JSON Schema calls equal (``1 == 1.0``) and
    different for those it does not (``true != 1``)."""
    _check_deadline()
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, dict):
        return ("object", frozenset((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return ("array", tuple(_frozen(v) for v in value))
    return value


def _unique_items(validator: Any, unique: Any, instance: Any, schema: Any) -> Iterator[Any]:
    from jsonschema.exceptions import ValidationError

    if not unique or not validator.is_type(instance, "array"):
        return
    seen: set[Any] = set()
    for item in instance:
        _check_deadline()
        try:
            key = _frozen(item)
            duplicate = key in seen
        except TypeError:  # an unhashable leaf: not JSON data, so not equal to anything
            continue
        if duplicate:
            yield ValidationError("the array has non-unique elements")
            return
        seen.add(key)


def _bounded(keyword: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(keyword)
    def check(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        _check_deadline()
        return keyword(validator, value, instance, schema)

    return check


_BOUNDED: dict[type, type] = {}
_BOUNDED_LOCK = threading.Lock()


def bounded_validator(validator_cls: type) -> type:
    """``validator_cls`` with a deadline check in every keyword and a linear
    ``uniqueItems`` (one class per draft, made once)."""
    with _BOUNDED_LOCK:
        found = _BOUNDED.get(validator_cls)
        if found is None:
            import jsonschema

            keywords = {name: _bounded(fn) for name, fn in validator_cls.VALIDATORS.items()}  # type: ignore[attr-defined]
            if "uniqueItems" in keywords:
                keywords["uniqueItems"] = _bounded(_unique_items)
            found = _BOUNDED[validator_cls] = jsonschema.validators.extend(validator_cls, keywords)
        return found


# -- where validation runs -------------------------------------------------------------

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(_VALIDATION_THREADS, thread_name_prefix="rlm-validate")
        return _executor


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in the validation threads and await its result, so the event
    loop keeps serving other work meanwhile. Cancelling the await does not stop the
    thread: ``fn`` must bound itself (validation does, with its deadline)."""
    return await asyncio.get_running_loop().run_in_executor(_pool(), functools.partial(fn, *args))
