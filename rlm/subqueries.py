"""The host side of ``llm_query`` and friends for one run: the sub-query service.

REPL cells hand their sub-query prompts here (through the executor's ``SubQueries``
seam): each is counted, checked against the sub-model's window, sent through the run's
sub client and ledger (or run as a child RLM below ``max_depth``), recorded in the
trajectory and, for a batch, reported as progress. The sandbox side (what a prompt may
be) is ``rlm.sandbox.subqueries``. This module must not hold the root loop or a run's
lifecycle (``rlm.run``), nor talk to the network itself (the client does).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from rlm import prompts
from rlm.errors import LLMError
from rlm.repl import failed_slot
from rlm.schema import Schema
from rlm.structured import acheck_subquery_schema, structured_batch, structured_query
from rlm.trajectory import cap_text, prompt_text
from rlm.usage import check_budgetable

if TYPE_CHECKING:
    from rlm.run import Run

__all__ = [
    "DEFAULT_SUB_WINDOW_CHARS",
    "SUBCALL_CAP_CHARS",
    "SUBCALL_RECORDING",
    "SubQueryService",
]

# What a sub-model reads at once, in characters: about 125k tokens, the window of
# gpt-4o-mini and most current models. Longer sub-prompts are refused before sending.
DEFAULT_SUB_WINDOW_CHARS = 500_000
# What a trajectory keeps of each sub-query (RLM(record_subcalls=...)), and the cap.
SUBCALL_RECORDING = ("capped", "full", "none")
SUBCALL_CAP_CHARS = 2_000


class SubQueryService:
    """What ``llm_query`` and friends call, for one run: counts, meters, progress, recursion.

    At depth < max_depth a sub-query is a child RLM run on the prompt (its own REPLEnv,
    the same clients and limiter); at the last depth it is a plain model call.
    """

    def __init__(self, run: Run) -> None:
        self._run = run

    def _record(self, prompts_: Sequence[Any], replies: Sequence[Any],
                cached: Sequence[bool] = ()) -> None:
        """Put the sub-queries' prompts and replies in the trajectory (one event per
        call of llm_query or llm_query_batch, so a 10,000-item batch is one line).
        A call the cache answered is marked ``"cached": true``."""
        mode = self._run.rlm.record_subcalls
        if mode == "none":
            return
        limit = SUBCALL_CAP_CHARS if mode == "capped" else None

        def keep(text: str) -> str:
            return text if limit is None else cap_text(text, limit)

        calls = [{"prompt": keep(prompt_text(p)), "reply": keep(_reply_text(r))}
                 for p, r in zip(prompts_, replies, strict=True)]
        for call, hit in zip(calls, cached, strict=False):
            if hit:
                call["cached"] = True
        self._run.trajectory.emit("sub_queries", iteration=self._run.iterations, calls=calls)

    async def query(self, prompt: str, params: dict[str, Any]) -> Any:
        cached = [False]
        with self._run.tracking():
            try:
                reply = await self._query(prompt, params, cached)
            except LLMError as exc:
                self._record([prompt], [failed_slot(exc)])
                raise
        self._record([prompt], [reply], cached)
        return reply

    async def _query(self, prompt: str, params: dict[str, Any], cached: list[bool]) -> Any:
        run = self._run
        run.sub_calls += 1
        params = dict(params)
        check_budgetable(params)
        schema = await acheck_subquery_schema(params.pop("schema")) if "schema" in params else None
        oversized = self._oversized(prompt)
        if oversized is not None:
            raise oversized
        if run.depth + 1 < run.rlm.max_depth:
            return await self._child(prompt, schema)
        if schema is not None:
            return await structured_query(self._send, prompt, schema, params, run.rlm.sub_client)
        return await self._send(prompt, params, cached)

    async def _send(self, prompt: Any, params: dict[str, Any],
                    cached: list[bool] | None = None) -> str:
        run = self._run
        client = run.rlm.sub_client
        request = client.request(prompt, **{"model": run.rlm.recursive_model, **params})
        try:
            return await client.send(request, meter=run.sub_meter, ledger=run.ledger,
                                     cached=cached)
        except LLMError as exc:
            raise self._window_error(prompt, exc) from exc

    def _oversized(self, prompt: Any) -> LLMError | None:
        """The error for a prompt larger than the sub-model's window (never sent)."""
        window = self._run.rlm.sub_window_chars
        chars = _prompt_chars(prompt)
        if chars <= window:
            return None
        return LLMError(prompts.sub_window_error(chars, window))

    def _window_error(self, prompt: Any, exc: LLMError) -> LLMError:
        """A server's context-length refusal, said the way the prompt promises."""
        if not _is_context_length_error(exc):
            return exc
        return LLMError(prompts.sub_window_error(_prompt_chars(prompt), self._run.rlm.sub_window_chars),
                        status=exc.status, attempts=exc.attempts)

    async def batch(self, prompts: list[str], params: dict[str, Any]) -> list[Any]:
        cached = [False] * len(prompts)
        with self._run.tracking():
            replies = await self._batch(prompts, params, cached)
        self._record(prompts, replies, cached)
        return replies

    async def _batch(self, prompts: list[str], params: dict[str, Any],
                     cached: list[bool]) -> list[Any]:
        run = self._run
        run.sub_calls += len(prompts)
        # Oversized prompts are answered here and never sent; the rest go out as one batch.
        refused = {i: err for i, p in enumerate(prompts) if (err := self._oversized(p)) is not None}
        if refused:
            kept = [i for i in range(len(prompts)) if i not in refused]
            marks = [False] * len(kept)
            sendable = [prompts[i] for i in kept]
            sent = iter(await self._send_batch(sendable, params, marks) if sendable else [])
            for i, hit in zip(kept, marks, strict=True):
                cached[i] = hit
            return [failed_slot(refused[i]) if i in refused else next(sent) for i in range(len(prompts))]
        return await self._send_batch(prompts, params, cached)

    async def _send_batch(self, prompts: list[str], params: dict[str, Any],
                          cached: list[bool]) -> list[str]:
        run = self._run
        total = len(prompts)
        params = dict(params)
        check_budgetable(params)
        schema = await acheck_subquery_schema(params.pop("schema")) if "schema" in params else None
        if run.depth + 1 < run.rlm.max_depth:
            results = await asyncio.gather(
                *(self._child(p, schema) for p in prompts), return_exceptions=True
            )
        elif schema is not None:
            results = await structured_batch(
                self._send, self._send_many, prompts, schema, params, run.rlm.sub_client,
                self._progress(total),
            )
        else:
            results = await self._send_many(prompts, params, self._progress(total), cached)
        return [
            failed_slot(self._window_error(p, r) if isinstance(r, LLMError) else r)
            for p, r in zip(prompts, results, strict=True)
        ]

    async def _send_many(self, prompts: list[Any], params: dict[str, Any],
                         on_item_done: Callable[[int, int], None],
                         cached: list[bool] | None = None) -> list[Any]:
        run = self._run
        client = run.rlm.sub_client
        params = {"model": run.rlm.recursive_model, **params}
        requests = [client.request(p, **params) for p in prompts]
        before = run.sub_meter.snapshot()
        results = await client.send_many(
            requests, meter=run.sub_meter, ledger=run.ledger, on_item_done=on_item_done,
            cached=cached,
        )
        run.note_rate_limits("sub", client, params["model"], run.sub_meter.snapshot() - before)
        return results

    def _progress(self, total: int) -> Callable[[int, int], None]:
        step = max(1, total // 50)
        emit = self._run.trajectory.emit

        def progress(done: int, total_: int) -> None:
            if done == total_ or done % step == 0:
                emit("subcalls", done=done, total=total_)

        return progress

    async def _child(self, prompt: str, schema: Schema | None = None) -> Any:
        run = self._run
        child = await run.run_child(
            context=prompt, query=prompts.CHILD_QUERY, depth=run.depth + 1, parent=run,
            schema=schema,
        )
        if child.answer is None:
            raise LLMError(f"the child RLM found no answer ({child.error or child.stopped_reason})")
        return child.answer if schema is None else schema.to_json(child.output)


def _prompt_chars(prompt: Any) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    total = 0
    for message in prompt if isinstance(prompt, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(str(part.get("text", ""))) for part in content if isinstance(part, dict))
    return total


def _is_context_length_error(exc: BaseException) -> bool:
    # Servers word it differently: OpenAI "context_length_exceeded" / "maximum context
    # length", vLLM "longer than the maximum model length", llama.cpp "exceeds the
    # available context size".
    if not isinstance(exc, LLMError) or exc.status not in (400, 413, 422):
        return False
    text = str(exc).lower()
    return any(
        marker in text
        for marker in ("context length", "context_length", "context window", "maximum model length",
                       "context size", "too many tokens", "prompt is too long")
    )


def _reply_text(reply: Any) -> str:
    # A typed sub-query's reply is the parsed value; the log keeps it as JSON text.
    if isinstance(reply, str):
        return reply
    try:
        return json.dumps(reply, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(reply)
