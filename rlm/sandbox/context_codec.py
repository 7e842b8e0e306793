"""How a REPL's context crosses to its worker process: encoded on the host, decoded there.

The context is sent once per REPL, as the raw payload of the worker's ``init`` frame
(see ``wire``): a str as UTF-8 bytes (an ASCII str slice by slice, so the host never
holds a second full copy), bytes as they are, anything else as JSON (tuples arrive as
lists, dict keys as str). Both directions live here so they cannot drift apart; this
module holds no state and imports nothing host-only (the worker imports it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from rlm.errors import ConfigError

__all__ = ["CONTEXT_CHUNK", "decode_context", "encode_context"]

# Bytes per write of the context to the channel (the host awaits the drain in between).
CONTEXT_CHUNK = 8 * 1024 * 1024


def encode_context(context: Any) -> tuple[str, int, Iterator[bytes | memoryview]]:
    """How to send ``context``: its kind, its byte length, and chunks produced lazily.

    Raises ``ConfigError`` for a value that is neither str, bytes nor JSON-like.
    """
    if context is None:
        return "none", 0, iter(())
    if isinstance(context, str):
        if context.isascii():
            # An ASCII str's length is its UTF-8 length: encode slice by slice, so the
            # host never holds a second full copy.
            n = len(context)
            return (
                "str",
                n,
                (
                    context[i : i + CONTEXT_CHUNK].encode("ascii")
                    for i in range(0, n, CONTEXT_CHUNK)
                ),
            )
        return "str", *_chunks(context.encode("utf-8", "surrogatepass"))
    if isinstance(context, (bytes, bytearray, memoryview)):
        return "bytes", *_chunks(bytes(context) if isinstance(context, memoryview) else context)
    try:
        data = json.dumps(context, ensure_ascii=False).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"the process sandbox sends the context to its worker as JSON, and a "
            f"{type(context).__name__} is not JSON-like ({exc}); pass a str, bytes, list "
            "or dict, or use sandbox='local'"
        ) from exc
    return "json", *_chunks(data)


def decode_context(kind: str, payload: bytearray) -> Any:
    """The context a worker got: ``kind`` as ``encode_context`` named it, and its bytes."""
    if kind == "none":
        return None
    if kind == "str":
        return payload.decode("utf-8", "surrogatepass")
    if kind == "bytes":
        return bytes(payload)
    if kind == "json":
        return json.loads(payload)
    raise ValueError(f"unknown context kind {kind!r}")


def _chunks(data: bytes | bytearray) -> tuple[int, Iterator[memoryview]]:
    view = memoryview(data)
    return len(data), (view[i : i + CONTEXT_CHUNK] for i in range(0, len(data), CONTEXT_CHUNK))
