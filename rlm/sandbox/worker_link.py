"""The engine-loop side of one worker's channel: its reader task and request routing.

A ``WorkerLink`` reads the worker's frames as they come (refusing one over the frame cap
before a byte of it is read), routes the worker's requests to the env's
``RequestServer``, answers the host's pulls of a batch's prompts, keeps a dying cell's
output, and hands a command's answer to whoever awaits it. When the channel closes or
breaks, everything waiting on it fails with ``WorkerLost``.

It holds no executor state and decides nothing about the worker's fate (see
``process`` and ``worker_pool``); what arrives here is the worker's word, never more.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from rlm.sandbox.flow import max_frame_bytes
from rlm.sandbox.subqueries import LLMQueryError
from rlm.sandbox.wire import HEADER, pack, unpack_texts
from rlm.sandbox.worker_requests import RequestServer

__all__ = ["ANSWERS", "WorkerLink", "WorkerLost"]

# Bytes queued for a worker that does not read them, past which its requests wait.
_WRITE_BUFFER_HIGH = 8 << 20

# The messages whose prompts may ride in a frame's raw payload (``pack_texts``), and the
# field that holds them; any other message with a payload is malformed.
_TEXTS = {"items": "prompts", "query": "prompt"}

# The answer each command waits for (any other answer is dropped).
ANSWERS = {"init": "ready", "exec": "result", "get": "value", "raw": "raw_result", "reset": "clean"}


class WorkerLost(Exception):
    """The worker's channel closed (it died or was killed); ``status`` is its wait status."""

    def __init__(self, status: int | None, reason: str = "") -> None:
        super().__init__(reason or "worker lost")
        self.status = status
        self.reason = reason


class WorkerLink:
    """The engine-loop side of one worker's channel: a reader task and request routing."""

    def __init__(
        self,
        server: RequestServer,
        max_output_chars: int,
        pid: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        # The link holds the env's request server, never its executor: a running reader
        # task must not keep an abandoned executor alive (its finalizer kills the worker).
        self.server: RequestServer | None = server
        self.max_output_chars = max_output_chars
        self.max_frame = max_frame_bytes(server.limits)
        self.pulls: dict[Any, asyncio.Future[list[Any]]] = {}
        self.pid = pid
        self.reader = reader
        self.writer = writer
        self.reply: asyncio.Future[dict[str, Any]] | None = None
        self.partial: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.partial_len = 0
        self.tasks: dict[Any, asyncio.Task[None]] = {}
        self.dead = False
        self.timed_out = False
        self.lost: WorkerLost | None = None
        # The answer op the pending command waits for (see ANSWERS).
        self.expect: str | None = None
        # Set for good once the worker asked to hand out a data library.
        self.tainted = False
        # Why the host killed a worker that said its cell was over (see cell_watch).
        self.killed_by_host = ""
        # The worker's first report of its protections (sent before any user code ran).
        self.hello: dict[str, Any] | None = None
        self.read_task = asyncio.get_running_loop().create_task(self._read_loop())

    def bind(self, server: RequestServer | None, max_output_chars: int = 0) -> None:
        """Route this worker's requests to ``server`` (None while it waits in a pool)."""
        self.server = server
        if server is None:
            return
        self.max_output_chars = max_output_chars
        self.max_frame = max_frame_bytes(server.limits)
        self.partial = {"stdout": [], "stderr": []}
        self.partial_len = 0
        self.timed_out = False

    def send(self, msg: dict[str, Any]) -> None:
        """Queue one message for the worker (dropped once the worker is gone)."""
        if not self.dead:
            self.writer.write(pack(msg))

    async def pull(self, rid: Any, start: int, count: int, budget: int) -> list[Any]:
        """Ask the worker for up to ``count`` prompts of batch ``rid`` from ``start``."""
        if self.dead or rid in self.pulls:
            raise LLMQueryError("llm_query_batch: the worker is gone")
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.pulls[rid] = fut
        try:
            self.send({"op": "pull", "id": rid, "start": start, "count": count, "max_bytes": budget})
            return await fut
        finally:
            self.pulls.pop(rid, None)

    async def command(self, msg: dict[str, Any], limit: float | None) -> dict[str, Any]:
        """Send one command and wait for its answer; raises WorkerLost or TimeoutError."""
        return await self.answer(ANSWERS[msg["op"]], limit, msg)

    async def answer(
        self, expect: str, limit: float | None, msg: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Wait for the worker's next ``expect`` message (sending ``msg`` first, if any);
        raises WorkerLost or TimeoutError."""
        if self.dead:
            raise self.lost or WorkerLost(None)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.reply, self.expect = fut, expect
        try:
            if msg is not None:
                self.send(msg)
            return await asyncio.wait_for(fut, limit)
        finally:
            self.reply = self.expect = None

    async def _read_loop(self) -> None:
        reason = ""
        try:
            while True:
                head = await self.reader.readexactly(HEADER.size)
                json_len, payload_len = HEADER.unpack(head)
                if json_len + payload_len > self.max_frame:
                    # Refused before a byte of it is read: a worker cannot make the host
                    # allocate more than one frame's worth.
                    reason = (
                        f"it sent a message of {json_len + payload_len:,} bytes, more than "
                        f"the {self.max_frame:,} the sandbox accepts"
                    )
                    break
                body = await self.reader.readexactly(json_len)
                payload = await self.reader.readexactly(payload_len) if payload_len else None
                try:
                    msg = json.loads(body)
                    del body
                    ok = isinstance(msg, dict) and self._dispatch(msg, payload)
                    del payload
                except Exception:  # noqa: BLE001 - deep nesting, bad UTF-8, odd types...
                    ok = False
                if not ok:
                    reason = "it sent a malformed message"
                    break
                if self.writer.transport.get_write_buffer_size() > _WRITE_BUFFER_HIGH:
                    # The worker is not reading its replies: stop reading its requests.
                    await self.writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            reason = "closed"
        except Exception:  # noqa: BLE001 - whatever breaks the reader, the worker goes
            reason = "its channel broke"
        self.dead = True
        # EOF leaves a stream transport half-open; close it now, whoever buries us later.
        self.writer.close()
        self.lost = WorkerLost(None, reason)
        for task in self.tasks.values():
            task.cancel()
        for pull in self.pulls.values():
            if not pull.done():
                pull.set_exception(self.lost)
        fut = self.reply
        if fut is not None and not fut.done():
            fut.set_exception(self.lost)

    def _dispatch(self, msg: dict[str, Any], payload: bytes | None = None) -> bool:
        op = msg.get("op")
        if payload is not None:
            key = _TEXTS.get(op)
            if key is None:
                return False
            msg[key] = unpack_texts(msg.get(key), payload)
        if op in ("query", "batch", "tool"):
            rid = msg.get("id")
            if not isinstance(rid, int) or rid in self.tasks:
                return False
            server = self.server
            if server is None:
                return False
            task = asyncio.get_running_loop().create_task(server.serve(self, msg))
            self.tasks[rid] = task
            task.add_done_callback(lambda _t: self.tasks.pop(rid, None))
            return True
        if op == "items":
            fut = self.pulls.get(msg.get("id"))
            prompts = msg.get("prompts")
            if fut is None or fut.done() or not isinstance(prompts, list):
                return False
            fut.set_result(prompts)
            return True
        if op == "cancel":
            # The cell stopped waiting (deadline, cancelled await): drop the request.
            task = self.tasks.pop(msg.get("id"), None)
            if task is not None:
                task.cancel()
            return True
        if op == "out":
            text, stream = msg.get("text"), msg.get("stream")
            if not isinstance(text, str) or stream not in self.partial:
                return False
            # Kept only for a cell that dies before it can report; bounded like output.
            room = self.max_output_chars - self.partial_len
            if room > 0:
                self.partial[stream].append(text[:room])
                self.partial_len += min(len(text), room)
            return True
        if op in ("result", "value", "raw_result", "ready", "clean"):
            fut = self.reply
            # A reply nobody waits for any more (its command was cancelled), or not the
            # kind the command waits for, is dropped.
            if fut is not None and not fut.done() and op == self.expect:
                fut.set_result(msg)
            return True
        if op == "data":
            # The worker is about to hand out a data library, which runs arbitrary code by
            # design: it is marked before the answer leaves, so whatever the worker does
            # or says afterwards, this process is never lent to another REPL.
            rid = msg.get("id")
            if not isinstance(rid, int):
                return False
            self.tainted = True
            self.send({"op": "reply", "id": rid, "ok": True, "result": None})
            return True
        if op == "hello":
            # What a fresh worker reports of its confinement before any user code exists;
            # the first report is the only one believed.
            prot = msg.get("protections")
            if self.hello is None and isinstance(prot, dict):
                self.hello = prot
            return True
        return False
