"""The worker's end of its channel to the host: one reader thread, one writer thread.

The reader takes every frame the host sends: replies to the worker's own requests
(sub-queries, batches, tool calls) resolve their futures here, the host's pulls of a
batch's prompts are answered here, and commands (init, exec, get, reset...) go to a
queue the worker's request loop (``worker``) takes them from. The writer owns the
socket's sending side, so no other thread ever blocks on a full socket: not the cell
(which must notice its deadline) and not the reader (which must keep draining the
host's replies, or both sides could wait on each other).

Worker-side only: it must stay importable in the worker without anything host-only.
It holds no cell running (see ``worker_session``) and no confinement.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import queue
import socket
import threading
from dataclasses import dataclass
from typing import Any

from rlm.sandbox.wire import (
    EXIT_BROKEN,
    EXIT_OUT_OF_MEMORY,
    HEADER,
    MAX_JSON,
    pack,
    pack_texts,
    recv_frame,
)

__all__ = ["OutBatch", "TooLarge", "WorkerChannel", "flow_limits", "remote_error", "shrunk"]


@dataclass
class OutBatch:
    """A batch the worker announced: its prompts (pulled by the host) and replies so far."""

    items: list[Any]
    sizes: list[int]
    results: list[Any]
    filled: int = 0


class TooLarge(Exception):
    """A message larger than the host accepts in one frame."""

    def __init__(self, size: int) -> None:
        super().__init__(f"{size} bytes")
        self.size = size


def flow_limits(options: dict[str, Any] | None = None) -> Any:
    """The env's sub-query caps (``rlm.sandbox.flow.SubQueryLimits``) from the init message."""
    from rlm.sandbox.flow import SubQueryLimits

    return SubQueryLimits(**{k: int(v) for k, v in (options or {}).items()})


class WorkerChannel:
    """The worker's side of the channel: sending, request futures and the command queue."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.send_lock = threading.Lock()
        self.commands: queue.SimpleQueue[tuple[dict[str, Any], bytearray | None]] = (
            queue.SimpleQueue()
        )
        self.waiters: dict[int, tuple[str, concurrent.futures.Future[Any]]] = {}
        self.waiters_lock = threading.Lock()
        self.next_id = 0
        self.batches: dict[int, OutBatch] = {}
        self.outbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        # Replaced by the env's own caps when its init message arrives.
        self.limits = flow_limits()
        self.max_frame = MAX_JSON

    def fileno(self) -> int:
        """The channel's descriptor (what confinement keeps open and a reset expects)."""
        return self.sock.fileno()

    def start(self) -> set[int]:
        """Start the reader and writer threads; their idents (threads a reset expects)."""
        writer = threading.Thread(target=self._write_loop, name="rlm-writer", daemon=True)
        writer.start()
        reader = threading.Thread(target=self._read_loop, name="rlm-channel", daemon=True)
        reader.start()
        return {writer.ident or 0, reader.ident or 0}

    def set_limits(self, options: dict[str, Any] | None) -> None:
        """Take a new REPL's sub-query caps (and so the host's frame cap) from its init."""
        from rlm.sandbox.flow import max_frame_bytes

        self.limits = flow_limits(options)
        self.max_frame = max_frame_bytes(self.limits)

    # sending ------------------------------------------------------------------------

    def send(self, msg: dict[str, Any], texts: str | None = None) -> None:
        """Queue one message for the host; raises TooLarge past the host's frame cap.
        The text of field ``texts`` (prompts) rides in the raw payload (``pack_texts``)."""
        self.outbox.put(self._frame(msg, texts))

    def send_now(self, msg: dict[str, Any]) -> None:
        """Send from the calling thread: output of a cell that may never release the GIL
        again (a long C call about to be killed) must leave before the writer could run."""
        data = self._frame(msg)
        with self.send_lock:
            self.sock.sendall(data)

    def send_reply(self, msg: dict[str, Any]) -> None:
        """Queue a command's answer, replacing a too-large value with an error saying so."""
        try:
            self.send(msg)
        except TooLarge as exc:
            self.send(shrunk(msg, exc.size, self.max_frame))

    def _frame(self, msg: dict[str, Any], texts: str | None = None) -> bytes:
        data = pack(msg) if texts is None else pack_texts(msg, texts)
        if len(data) - HEADER.size > self.max_frame:
            raise TooLarge(len(data) - HEADER.size)
        return data

    def _write_loop(self) -> None:
        try:
            while True:
                data = self.outbox.get()
                with self.send_lock:
                    self.sock.sendall(data)
        except OSError:  # the host is gone: the reader sees EOF and ends the worker
            return

    # receiving ----------------------------------------------------------------------

    def _read_loop(self) -> None:
        try:
            while True:
                msg, payload = recv_frame(self.sock)
                op = msg.get("op")
                if op == "reply":
                    self._resolve(msg)
                elif op == "pull":
                    self._pull(msg)
                elif op == "part":
                    self._part(msg)
                else:
                    # Only an init (the next REPL on a reused worker) carries a payload.
                    self.commands.put((msg, payload if op == "init" else None))
        except EOFError:  # the host closed the channel (or died): nothing left to do
            os._exit(0)
        except MemoryError:
            os._exit(EXIT_OUT_OF_MEMORY)
        except BaseException:  # noqa: BLE001 - a broken frame: the host reports the death
            os._exit(EXIT_BROKEN)

    def _resolve(self, msg: dict[str, Any]) -> None:
        rid = msg.get("id", -1)
        with self.waiters_lock:
            entry = self.waiters.pop(rid, None)
            batch = self.batches.pop(rid, None)
        if entry is None:
            return
        op, future = entry
        try:
            if not msg.get("ok"):
                future.set_exception(remote_error(op, msg))
            elif batch is None:
                future.set_result(msg.get("result"))
            elif batch.filled != len(batch.results):
                future.set_exception(remote_error(op, {"error": "the batch came back incomplete"}))
            else:
                future.set_result(batch.results)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled meanwhile (the cell was stopped)

    def _pull(self, msg: dict[str, Any]) -> None:
        """The host has room: send it the next slice of a batch (at least one prompt)."""
        rid, start = msg["id"], int(msg["start"])
        count, budget = int(msg["count"]), int(msg["max_bytes"])
        with self.waiters_lock:
            batch = self.batches.get(rid)
        prompts: list[Any] = []
        if batch is not None and 0 <= start < len(batch.items):
            end, used = start, 0
            stop = min(start + max(count, 1), len(batch.items))
            while end < stop and (end == start or used + batch.sizes[end] <= budget):
                used += batch.sizes[end]
                end += 1
            prompts = batch.items[start:end]
        while True:
            try:
                self.send({"op": "items", "id": rid, "start": start, "prompts": prompts},
                          texts="prompts")
                return
            except TooLarge:
                # The slice is too big for one frame (a message list's JSON escaping can
                # make it so): send fewer prompts.
                if len(prompts) <= 1:
                    prompts = []
                else:
                    prompts = prompts[: len(prompts) // 2]

    def _part(self, msg: dict[str, Any]) -> None:
        rid, start, replies = msg.get("id"), msg.get("start"), msg.get("results")
        with self.waiters_lock:
            batch = self.batches.get(rid)
            if batch is None or not isinstance(start, int) or not isinstance(replies, list):
                return
            if start < 0 or start + len(replies) > len(batch.results):
                return
            batch.results[start : start + len(replies)] = replies
            batch.filled += len(replies)

    # requests to the host -----------------------------------------------------------

    def submit(self, op: str, **fields: Any) -> concurrent.futures.Future[Any]:
        """Send a request to the host; the future resolves when its reply arrives.

        The sync stubs block on it with the policy's ``wait_for_future`` (so a stopped
        cell stops waiting), the async ones await it; many can be in flight at once.
        Cancelling the future (a stopped cell) tells the host to drop the request.
        """
        return self._submit(op, None, fields)

    def submit_batch(self, items: list[Any], params: dict[str, Any]) -> concurrent.futures.Future[Any]:
        """Announce a batch after checking the env's caps; the host pulls its prompts.

        Only the count crosses now; the host asks for slices as its slots free up, and
        sends each slice's replies back as they finish.
        """
        from rlm.sandbox import flow

        flow.check_batch_size(len(items), self.limits)
        sizes = [flow.prompt_bytes(p) for p in items]
        for i, size in enumerate(sizes):
            flow.check_prompt_size(size, self.limits, i)
        batch = OutBatch(items, sizes, [None] * len(items))
        return self._submit("batch", batch, {"n": len(items), "params": params})

    def check_prompt(self, prompt: Any) -> None:
        """Refuse a single prompt over ``max_prompt_bytes`` before it is sent."""
        from rlm.sandbox import flow

        flow.check_prompt_size(flow.prompt_bytes(prompt), self.limits)

    def drop_pending(self) -> None:
        """Forget every request still waiting for the host (a reset): cancel their futures."""
        with self.waiters_lock:
            pending = list(self.waiters.values())
            self.waiters.clear()
            self.batches.clear()
        for _op, future in pending:
            future.cancel()

    def _submit(
        self, op: str, batch: OutBatch | None, fields: dict[str, Any]
    ) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self.waiters_lock:
            self.next_id += 1
            rid = self.next_id
            self.waiters[rid] = (op, future)
            if batch is not None:
                self.batches[rid] = batch
        try:
            data = self._frame({"op": op, "id": rid, **fields}, "prompt" if op == "query" else None)
        except (TypeError, ValueError, TooLarge) as exc:
            with self.waiters_lock:
                self.waiters.pop(rid, None)
                self.batches.pop(rid, None)
            what = f"tool {fields.get('name')!r}" if op == "tool" else "llm_query"
            if isinstance(exc, TooLarge):
                raise TypeError(
                    f"the arguments of {what} are {exc.size:,} bytes once encoded, more than "
                    f"the {self.max_frame:,} that can reach the host process; pass less data"
                ) from None
            raise TypeError(
                f"the arguments of {what} must be JSON-like data (str, int, float, bool, None, "
                f"lists and dicts) to reach the host process: {exc}"
            ) from None
        future.add_done_callback(lambda f: f.cancelled() and self._cancel(rid))
        self.outbox.put(data)
        return future

    def _cancel(self, rid: int) -> None:
        with self.waiters_lock:
            self.waiters.pop(rid, None)
            self.batches.pop(rid, None)
        with contextlib.suppress(OSError):
            self.send({"op": "cancel", "id": rid})


def remote_error(op: str, msg: dict[str, Any]) -> Exception:
    """The exception a failed host request raises in the cell."""
    text = str(msg.get("error") or "the host could not answer")
    if op != "tool":
        from rlm.sandbox.subqueries import LLMQueryError

        return LLMQueryError(text)
    # A tool's own exception type when it is a builtin one (ValueError, KeyError...), so
    # cell code can catch it as it would in-process; anything else as a RuntimeError.
    import builtins

    kind = getattr(builtins, str(msg.get("type")), None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        with contextlib.suppress(Exception):
            return kind(text)
    return RuntimeError(f"{msg.get('type')}: {text}")


def shrunk(msg: dict[str, Any], size: int, limit: int) -> dict[str, Any]:
    """``msg`` with its bulky value replaced by an error the model can act on."""
    what = f"{size:,} bytes, more than the {limit:,} the process sandbox sends to the host"
    op = msg.get("op")
    if op == "result":
        cap = 4096
        return {
            "op": "result",
            "stdout": str(msg.get("stdout") or "")[:cap],
            "stderr": str(msg.get("stderr") or "")[:cap],
            "error": f"ValueError: the cell's result (its FINAL answer and output) is {what}; "
            "give FINAL a shorter answer",
            "final": None,
            "truncated": True,
        }
    if op == "value":
        return {"op": "value", "ok": True, "value": None, "repr": f"a value of {what}"}
    return {"op": op, "ok": False, "error": f"the reply is {what}"}
