"""The cell-running half of a worker: one REPL's namespace, output and llm_query stubs.

A ``Session`` does what ``LocalExecutor`` does, with the same policy functions and
messages; only the llm_query family and tools differ, being stubs that ask the host
over the worker's channel. One session per REPL; a reused worker makes a new one for
each REPL it serves. Worker-side only (nothing host-only is imported); it holds no
channel mechanics (see ``worker_channel``) and no reset (see ``worker_reset``).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

from rlm.sandbox.watchdog import Watchdog
from rlm.sandbox.worker_channel import WorkerChannel

__all__ = ["Session", "jsonable"]


def jsonable(value: Any) -> dict[str, Any]:
    """``value`` as a JSON reply: a JSON copy, or its repr when it is not JSON-like."""
    try:
        return {"ok": True, "value": json.loads(json.dumps(value))}
    except (TypeError, ValueError, RecursionError):
        return {"ok": True, "value": None, "repr": repr(value)[:2000]}


class Session:
    """The cell-running half of a worker: the policy's namespace, output and llm_query stubs.

    It does what ``LocalExecutor`` does, with the same policy functions and messages;
    only the llm_query family and tools differ, being stubs that ask the host.
    """

    def __init__(
        self,
        channel: WorkerChannel,
        watchdog: Watchdog,
        init: dict[str, Any],
        context: Any,
        *,
        file_access: bool,
        data_modules: tuple[str, ...],
    ) -> None:
        import asyncio

        from rlm.sandbox import cells

        self.channel = channel
        self.setup_code: str | None = init.get("setup_code")
        self.limit = int(init.get("max_output_chars", 20_000))
        self.memory_limit_mb = init.get("memory_limit_mb")
        self.out = cells.OutputBuffer(self.limit)
        self.err = cells.OutputBuffer(self.limit)
        # What a killed cell still shows: the head of its output, sent as it is written.
        self.streamed = 0
        self.last_flush = 0.0
        self.loop = asyncio.new_event_loop()
        self.watchdog = watchdog
        self.data_imported = False
        extra: dict[str, Any] = {"context": context}
        extra.update(self._llm_functions())
        extra.update(self._tool_stubs(init.get("tools") or []))
        self.ns = cells.build_namespace(
            write_stdout=lambda text: self._write("stdout", text),
            write_stderr=lambda text: self._write("stderr", text),
            extra=extra,
            file_access=file_access,
            data_modules=data_modules,
            on_data_import=self._before_data_import,
        )

    def _before_data_import(self, name: str) -> None:
        """Tell the host before a data library is first handed out, and wait until it has
        heard: from then on it never lends this worker to another REPL. Those libraries
        run arbitrary code by design (yaml.unsafe_load, pickles), so nothing the worker
        says after this import can be trusted, which is why the host must know first."""
        if self.data_imported:
            return
        from rlm.sandbox import cells

        future = self.channel.submit("data", name=name)
        try:
            cells.wait_for_future(self.ns, future)
        except Exception as exc:
            raise ImportError(f"import of {name!r} failed: the host did not answer ({exc})") from None
        self.data_imported = True

    def close(self) -> None:
        """Drop everything this REPL made: its namespace (the context with it) and its
        cell loop (tasks a cell started were cancelled when that cell ended)."""
        from rlm.sandbox import cells

        cells.release_namespace(self.ns)
        with contextlib.suppress(Exception):
            self.loop.close()

    # output -------------------------------------------------------------------------

    def _write(self, stream: str, text: str) -> None:
        (self.out if stream == "stdout" else self.err).write(text)
        room = self.limit - self.streamed
        if room <= 0 or not text:
            return
        part = text[:room]
        self.streamed += len(part)
        now = time.monotonic()
        # Throttled so a print loop does not become a message per line; the result
        # carries the full (capped) output anyway, this is only for a cell that dies.
        if now - self.last_flush >= 0.02 or self.streamed >= self.limit:
            self.last_flush = now
            with contextlib.suppress(OSError):
                self.channel.send_now({"op": "out", "stream": stream, "text": part})

    # cells --------------------------------------------------------------------------

    def setup(self) -> str | None:
        """Run the REPL's setup code (no time limit); its error text, or None."""
        if not self.setup_code:
            return None
        return self._run(self.setup_code, None, "<setup>")["error"]

    def run_cell(self, code: str, timeout: float | None, filename: str) -> dict[str, Any]:
        """Run one cell under the policy; its ``result`` message (output, error, FINAL)."""
        return self._run(code, timeout, filename)

    def _run(self, code: str, timeout: float | None, filename: str) -> dict[str, Any]:
        from rlm.sandbox import cells, compiler
        from rlm.sandbox.cells import timeout_reason

        self.out = cells.OutputBuffer(self.limit)
        self.err = cells.OutputBuffer(self.limit)
        self.streamed = 0
        self.last_flush = 0.0
        error: str | None = None
        final: Any = None
        try:
            try:
                cell = compiler.compile_cell(code, filename)
            except compiler.PolicyError as exc:
                error = str(exc)
            else:
                reason = timeout_reason(timeout)
                try:
                    cells.run_cell(
                        cell,
                        self.ns,
                        self.loop,
                        on_start=lambda stop: self.watchdog.arm(stop, timeout, reason),
                    )
                except BaseException as exc:  # noqa: BLE001 - every fault of user code is reported
                    error = cells.format_user_error(exc, cell, self.ns)
                    if isinstance(exc, MemoryError) and self.memory_limit_mb:
                        error += (
                            f"\nThe process sandbox limits the REPL to {self.memory_limit_mb} MB"
                            " of memory (memory_limit_mb); the REPL keeps its variables."
                        )
                    del exc
                finally:
                    self.watchdog.disarm()
                final = cells.take_final(self.ns)
        except BaseException as exc:  # noqa: BLE001 - the worker must survive anything
            error = error or f"{type(exc).__name__}: the REPL could not run the cell ({exc})"
        return {
            "op": "result",
            "stdout": self.out.getvalue(),
            "stderr": self.err.getvalue(),
            "error": error,
            "final": final,
            "truncated": self.out.truncated or self.err.truncated,
        }

    def get(self, name: str) -> dict[str, Any]:
        """The ``value`` message for variable ``name`` (not found: ``ok`` False)."""
        ns = self.ns
        if not isinstance(name, str) or name.startswith("_") or name not in ns:
            return {"op": "value", "ok": False}
        return {"op": "value", **jsonable(ns[name])}

    # the llm_query family and tools -------------------------------------------------

    def _llm_functions(self) -> dict[str, Any]:
        """Stubs with the local executor's checks, errors and notes; the work is the host's."""
        import asyncio

        from rlm.sandbox import cells, subqueries
        from rlm.sandbox.subqueries import prompt_list, query_error_text

        channel = self.channel
        LLMQueryError = subqueries.LLMQueryError  # noqa: N806 - the class, under its own name

        def note_failures(results: list[str]) -> None:
            failed = subqueries.count_failed_slots(results)
            if failed:
                self._write(
                    "stderr",
                    f"llm_query_batch: {failed} of {len(results)} sub-queries failed after "
                    "retries; their slots hold '[llm_query error: ...]' strings\n",
                )

        def llm_query(prompt: Any, **params: Any) -> str:
            """Ask a sub-model one prompt (a str or a list of chat messages); returns its reply."""
            subqueries.check_subquery_prompt(prompt)
            subqueries.check_subquery_params(params)
            channel.check_prompt(prompt)
            future = channel.submit("query", prompt=prompt, params=params)
            try:
                return cells.wait_for_future(self.ns, future)
            except Exception as exc:
                raise LLMQueryError(query_error_text(exc)) from None

        def llm_query_batch(prompts: Any, **params: Any) -> list[str]:
            """Ask a sub-model many prompts concurrently; replies in order, failures as error strings."""
            items = prompt_list(prompts)
            subqueries.check_subquery_params(params)
            if not items:
                return []
            future = channel.submit_batch(items, params)
            try:
                results = cells.wait_for_future(self.ns, future)
            except Exception as exc:
                raise LLMQueryError(query_error_text(exc)) from None
            note_failures(results)
            return results

        async def llm_query_async(prompt: Any, **params: Any) -> str:
            """Async form of llm_query: ``await llm_query_async(prompt)``."""
            subqueries.check_subquery_prompt(prompt)
            subqueries.check_subquery_params(params)
            channel.check_prompt(prompt)
            future = channel.submit("query", prompt=prompt, params=params)
            try:
                return await asyncio.wrap_future(future)
            except Exception as exc:
                raise LLMQueryError(query_error_text(exc)) from None

        async def llm_query_batch_async(prompts: Any, **params: Any) -> list[str]:
            """Async form of llm_query_batch: ``await llm_query_batch_async(prompts)``."""
            items = prompt_list(prompts)
            subqueries.check_subquery_params(params)
            if not items:
                return []
            future = channel.submit_batch(items, params)
            try:
                results = await asyncio.wrap_future(future)
            except Exception as exc:
                raise LLMQueryError(query_error_text(exc)) from None
            note_failures(results)
            return results

        return {
            "llm_query": llm_query,
            "llm_query_batch": llm_query_batch,
            "llm_query_async": llm_query_async,
            "llm_query_batch_async": llm_query_batch_async,
        }

    def _tool_stubs(self, tools: list[dict[str, Any]]) -> dict[str, Any]:
        """A function per host tool; calling it runs the tool in the host (JSON in, JSON out)."""
        return {spec["name"]: self._tool_stub(spec) for spec in tools}

    def _tool_stub(self, spec: dict[str, Any]) -> Callable[..., Any]:
        import asyncio

        name = str(spec["name"])
        from rlm.sandbox import cells

        channel = self.channel
        stub: Callable[..., Any]
        if spec.get("async"):

            async def async_tool(*args: Any, **kwargs: Any) -> Any:
                return await asyncio.wrap_future(
                    channel.submit("tool", name=name, args=args, kwargs=kwargs)
                )

            stub = async_tool
        else:

            def tool(*args: Any, **kwargs: Any) -> Any:
                future = channel.submit("tool", name=name, args=args, kwargs=kwargs)
                return cells.wait_for_future(self.ns, future)

            stub = tool
        stub.__name__ = stub.__qualname__ = name
        stub.__doc__ = spec.get("doc")
        return stub
