"""The host's answers to what a worker asks for: sub-queries, batches and tool calls.

A worker's ``llm_query`` family and tools are stubs that send requests over the
channel; ``RequestServer`` runs them here, on the engine loop, against the env's
``SubQueryGate`` (one client and limiter for every env) and its tools, many at once,
replying by request id. The worker is not trusted: every request is checked again with
the policy's own checks, so even a subverted worker can only make ordinary requests,
and a tool's result must be JSON-like before it goes back.

It holds no channel mechanics (see ``worker_link``) and no executor lifecycle.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rlm.sandbox.flow import SubQueryGate, SubQueryLimits
from rlm.sandbox.host_threads import tool_pool
from rlm.sandbox.subqueries import check_subquery_params, check_subquery_prompt, query_error_text
from rlm.sandbox.wire import pack

if TYPE_CHECKING:
    from rlm.sandbox.worker_link import WorkerLink

__all__ = ["RequestServer"]


class RequestServer:
    """Serves one env's worker requests: its sub-query gate and its (wrapped) tools."""

    def __init__(self, sub_queries: SubQueryGate, tools: dict[str, Callable[..., Any]]) -> None:
        self.sub_queries = sub_queries
        self.tools = tools

    @property
    def limits(self) -> SubQueryLimits:
        """The env's sub-query caps (what bounds a frame from its worker, too)."""
        return self.sub_queries.limits

    async def serve(self, link: WorkerLink, msg: dict[str, Any]) -> None:
        """Answer one request from ``link``'s worker (a sub-query, a batch or a tool call)."""
        rid = msg.get("id")
        try:
            if msg["op"] == "batch":
                result = await self._serve_batch(link, msg)
            else:
                result = await self._handle(msg)
            data = pack({"op": "reply", "id": rid, "ok": True, "result": result})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the cell
            text = query_error_text(exc) if msg["op"] != "tool" else _describe(exc)
            data = pack(
                {"op": "reply", "id": rid, "ok": False, "error": text, "type": type(exc).__name__}
            )
        if not link.dead:
            link.writer.write(data)

    async def _handle(self, msg: dict[str, Any]) -> Any:
        op = msg["op"]
        if op == "tool":
            return await self._call_tool(msg.get("name"), msg.get("args"), msg.get("kwargs"))
        params = _params(msg)
        prompt = msg.get("prompt")
        check_subquery_prompt(prompt)
        return await self.sub_queries.query(prompt, params)

    async def _serve_batch(self, link: WorkerLink, msg: dict[str, Any]) -> None:
        """Run a batch the worker announced, pulling its prompts as this env's slots free.

        The gate asks for one slice at a time; each slice's replies go back to the
        worker as soon as they are in, so the host never holds the whole batch, in
        either direction.
        """
        params = _params(msg)
        rid, n = msg.get("id"), msg.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise TypeError("llm_query_batch takes a list of prompts")

        async def fetch(start: int, count: int, budget: int) -> list[Any]:
            return await link.pull(rid, start, count, budget)

        def deliver(start: int, replies: list[Any]) -> None:
            link.send({"op": "part", "id": rid, "start": start, "results": replies})

        await self.sub_queries.run_batch(n, fetch, deliver, params)

    async def _call_tool(self, name: Any, args: Any, kwargs: Any) -> Any:
        tool = self.tools.get(name) if isinstance(name, str) else None
        if tool is None or not isinstance(args, list) or not isinstance(kwargs, dict):
            raise TypeError(f"no tool named {name!r}")
        if inspect.iscoroutinefunction(tool):
            result = await tool(*args, **kwargs)
        else:
            # A sync tool may block: run it off the engine loop.
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(tool_pool(), functools.partial(tool, *args, **kwargs))
        try:
            return json.loads(json.dumps(result))
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"tool {name!r} returned a {type(result).__name__}, which cannot be sent to "
                "the process sandbox (only JSON-like values can)"
            ) from exc


def _params(msg: dict[str, Any]) -> dict[str, Any]:
    params = msg.get("params")
    if not isinstance(params, dict):
        raise TypeError("llm_query parameters must be keyword arguments")
    check_subquery_params(params)
    return params


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return text if text else type(exc).__name__
