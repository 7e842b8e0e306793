"""Values crossing the sandbox boundary, converted to exact builtin types.

Cell code can subclass ``str``, ``dict``, ``list``, ``int`` and ``float`` and override
their public methods (``startswith``, ``items``, ``strip`` ...). Host code that judges
or uses such an object would run the cell's methods: a guard could be lied to, the
engine thread could be stalled, and the host could run sandbox code after the cell
ended. So every value the host keeps or acts on is first copied into exact builtin
types here, reading the data with the base types' own methods (never the subclass's)
and with caps on depth and size so a hostile structure cannot exhaust the host.

``to_plain_data`` is the general form (JSON-compatible data); ``exact_str`` is the
form for names and answers.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PlainDataError", "exact_str", "to_plain_data"]

# Defaults sized for prompts and request parameters: far above what real messages use,
# far below what could hurt the host.
MAX_DEPTH = 32
MAX_NODES = 1_000_000


class PlainDataError(TypeError):
    """A value is not plain data (or exceeds the depth or size cap)."""


def exact_str(value: Any, what: str = "value") -> str:
    """``value`` as an exact ``str``; a str subclass is copied without calling its methods.

    Raises TypeError for anything that is not a str. ``what`` names the value in the
    message (for example "attribute name").
    """
    if type(value) is str:
        return value
    if issubclass(type(value), str):
        # str.__str__ copies a subclass instance's characters into a new exact str; the
        # subclass's own methods (which may lie) are never called.
        return str.__str__(value)
    raise TypeError(f"{what} must be a string, not {type(value).__name__}")


def to_plain_data(value: Any, *, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> Any:
    """A copy of ``value`` made only of exact str, int, float, bool, None, list and dict.

    Accepts those types and their subclasses, tuples (as lists) and dicts whose keys
    are strings; anything else raises PlainDataError (a TypeError). The data is read
    with the builtin types' own methods, so overridden ``items``/``__iter__``/``__str__``
    of a subclass never run; nesting deeper than ``max_depth`` or more than
    ``max_nodes`` values in total (cycles included) is refused.
    """
    budget = [max_nodes]
    return _convert(value, max_depth, budget)


def _convert(value: Any, depth: int, budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise PlainDataError("the value is too large to hand to the host (too many items)")
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    if issubclass(kind, str):
        return str.__str__(value)
    if issubclass(kind, int):  # bool cannot be subclassed, so this is an int subclass
        return int.__index__(value)
    if issubclass(kind, float):
        return float.__float__(value)
    if depth <= 0:
        raise PlainDataError("the value is nested too deeply to hand to the host")
    if issubclass(kind, (list, tuple)):
        items = list.copy(value) if issubclass(kind, list) else tuple.__getitem__(value, slice(None))
        return [_convert(item, depth - 1, budget) for item in items]
    if issubclass(kind, dict):
        out: dict[str, Any] = {}
        for key, item in list(dict.items(value)):
            if not issubclass(type(key), str):
                raise PlainDataError(
                    f"dict keys must be strings to hand a value to the host, not {type(key).__name__}"
                )
            out[exact_str(key)] = _convert(item, depth - 1, budget)
        return out
    raise PlainDataError(
        f"{kind.__name__} is not plain data; use str, int, float, bool, None, list or dict"
    )
