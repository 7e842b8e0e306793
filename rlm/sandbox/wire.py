"""What crosses the process sandbox's boundaries: frames, control messages, exit statuses.

Shared by the host and by the processes of the sandbox (the zygote, a worker's init and
the worker), so it holds only the encoding: no state, no sockets of its own, and no
import of anything host-only (the zygote imports it before any worker exists).

Everything is JSON, never pickle. A channel frame is ``!IQ`` (JSON length, raw payload
length), the JSON object, then the raw payload: the host's to send a large context
without JSON-escaping it, the worker's to send the text of its sub-query prompts the
same way (``pack_texts``: each str stands in the JSON as its UTF-8 length, and its bytes
follow in order). A control message (host to zygote) is a ``!I`` length and the JSON,
with any file descriptors riding on its first bytes.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

__all__ = [
    "CONTROL_MAX",
    "EXIT_BROKEN",
    "EXIT_OUT_OF_MEMORY",
    "HEADER",
    "MAX_JSON",
    "MAX_PAYLOAD",
    "control_recv",
    "control_send",
    "pack",
    "pack_texts",
    "recv_exact",
    "recv_frame",
    "unpack_texts",
]

HEADER = struct.Struct("!IQ")
# Upper bounds on what either side accepts in one frame. A worker that announces more is
# broken or hostile; the host drops it rather than allocate what it asks for.
MAX_JSON = 256 * 1024 * 1024
MAX_PAYLOAD = 1 << 40
CONTROL_MAX = 1 << 20

# Exit statuses a worker uses for its own failures (the host turns them into words).
EXIT_BROKEN = 70
EXIT_OUT_OF_MEMORY = 86

_CONTROL_HEADER = struct.Struct("!I")


def pack(msg: dict[str, Any], payload_len: int = 0) -> bytes:
    """Encode ``msg`` as one frame header plus its JSON; the raw payload follows separately."""
    body = json.dumps(msg, ensure_ascii=False, separators=(",", ":")).encode(
        "utf-8", "surrogatepass"
    )
    return HEADER.pack(len(body), payload_len) + body


def pack_texts(msg: dict[str, Any], key: str) -> bytes:
    """Encode ``msg`` as one whole frame with the text of ``msg[key]`` (a str, or a list
    whose str items) in the raw payload: each str stands in the JSON as its UTF-8 byte
    length, its bytes following in order. JSON-escaping a 150 KB prompt on one side and
    parsing it on the other cost about 2 ms of CPU; this costs one copy.
    """
    value = msg[key]
    items = value if type(value) is list else [value]
    parts: list[bytes] = []
    shown: list[Any] = []
    for item in items:
        if type(item) is str:
            data = item.encode("utf-8", "surrogatepass")
            parts.append(data)
            shown.append(len(data))
        elif type(item) is int:
            return pack(msg)  # an int must always mean a length: send this one as JSON
        else:
            shown.append(item)
    size = sum(len(p) for p in parts)
    if not size:
        # No text bytes to move (no str, or only empty ones): a frame without a payload
        # must say its prompts in JSON, since an int there is no prompt.
        return pack(msg)
    body = json.dumps(
        {**msg, key: shown if type(value) is list else shown[0]},
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode("utf-8", "surrogatepass")
    return b"".join((HEADER.pack(len(body), size), body, *parts))


def unpack_texts(value: Any, payload: bytes | bytearray) -> Any:
    """``value`` (a field that ``pack_texts`` wrote) with each byte length replaced by its
    str from ``payload``; raises ValueError unless the lengths account for every byte."""
    items = value if type(value) is list else [value]
    view = memoryview(payload)
    out: list[Any] = []
    pos = 0
    for item in items:
        if type(item) is int:
            if item < 0 or pos + item > len(view):
                raise ValueError("a text runs past the frame's payload")
            out.append(str(view[pos : pos + item], "utf-8", "surrogatepass"))
            pos += item
        else:
            out.append(item)
    if pos != len(view):
        raise ValueError("the frame's payload holds bytes no text accounts for")
    return out if type(value) is list else out[0]


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    """Read exactly ``n`` bytes from a blocking socket; raises EOFError if it closes first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError
        got += k
    return buf


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], bytearray]:
    """Read one frame from a blocking socket; raises EOFError when the peer is gone."""
    json_len, payload_len = HEADER.unpack(recv_exact(sock, HEADER.size))
    if json_len > MAX_JSON or payload_len > MAX_PAYLOAD:
        raise EOFError
    msg = json.loads(recv_exact(sock, json_len))
    payload = recv_exact(sock, payload_len) if payload_len else bytearray()
    return msg, payload


def control_send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    """Send one control message: a length, the JSON, and any fds riding on its first bytes.

    The control channel is a stream socket on every platform (macOS has no Unix
    SOCK_SEQPACKET, and a datagram peer never sees the other end close).
    """
    body = json.dumps(msg).encode()
    data = _CONTROL_HEADER.pack(len(body)) + body
    sent = socket.send_fds(sock, [data], fds) if fds else sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


def control_recv(sock: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any] | None, list[int]]:
    """Read one control message and the fds sent with it; (None, fds) at end of stream."""
    fds: list[int] = []
    head = b""
    while len(head) < _CONTROL_HEADER.size:
        if max_fds and not head:
            chunk, got, _flags, _addr = socket.recv_fds(sock, _CONTROL_HEADER.size, max_fds)
            fds.extend(got)
        else:
            chunk = sock.recv(_CONTROL_HEADER.size - len(head))
        if not chunk:
            return None, fds
        head += chunk
    (length,) = _CONTROL_HEADER.unpack(head)
    if length > CONTROL_MAX:
        raise ValueError("control message too large")
    try:
        body = recv_exact(sock, length)
    except EOFError:
        return None, fds
    return json.loads(body), fds
