"""The host side of ``llm_query`` and friends for one run: the sub-query service.

REPL cells hand their sub-query prompts here (through the executor's ``SubQueries``
seam): each is counted, checked against the sub-model's window, sent through the run's
sub client and ledger (or run as a child RLM below ``max_depth``), recorded in the
trajectory and, for a batch, reported as progress. The sandbox side (what a prompt may
be) is ``rlm.sandbox.subqueries``. Each call is timed and metered here for the
trajectory (``SubCallTimes``): the spans and the viewer's timeline are drawn from that.
This module must not hold the root loop or a run's lifecycle (``rlm.run``), nor talk to
the network itself (the client does).
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from rlm import prompts
from rlm.errors import LLMError
from rlm.llm import LARGE_BATCH
from rlm.repl import failed_slot
from rlm.schema import Schema
from rlm.structured import acheck_subquery_schema, structured_batch, structured_query
from rlm.trajectory import SubCallTimes, cap_text, prompt_text
from rlm.usage import Usage, check_budgetable

if TYPE_CHECKING:
    from rlm.run import Run

__all__ = [
    "DEFAULT_SUB_WINDOW_CHARS",
    "SUBCALL_CAP_CHARS",
    "SUBCALL_RECORDING",
    "TIMED_ITEMS",
    "SubQueryService",
]

# What a sub-model reads at once, in characters: about 125k tokens, the window of
# gpt-4o-mini and most current models. Longer sub-prompts are refused before sending.
DEFAULT_SUB_WINDOW_CHARS = 500_000
# What a trajectory keeps of each sub-query (RLM(record_subcalls=...)), and the cap.
SUBCALL_RECORDING = ("capped", "full", "none")
SUBCALL_CAP_CHARS = 2_000
# The first sub-calls of each cell are sent one by one, so each gets its own timing,
# tokens and cost in the trajectory (and its own span: the same hundred); the client
# sends the rest of a batch as one (its window of tasks, its bulk cache lookup), recorded
# as when each was answered and what they used together. Per cell, not per batch: the
# REPL hands a batch of more than 1,024 prompts over in slices. Fewer when a batch
# would leave the client fewer than LARGE_BATCH prompts, the size from which it holds
# full garbage collections back (at 1,000 prompts, splitting 100 off cost a third more
# CPU). Each one timed costs about 0.13 ms of CPU more (benchmarks/tracing.py).
TIMED_ITEMS = 100


class SubQueryService:
    """What ``llm_query`` and friends call, for one run: counts, meters, progress, recursion.

    At depth < max_depth a sub-query is a child RLM run on the prompt (its own REPLEnv,
    the same clients and limiter); at the last depth it is a plain model call. Every
    call is timed (``SubCallTimes``) and metered on a meter of its own, whose usage
    joins the run's when the call ends.
    """

    def __init__(self, run: Run) -> None:
        self._run = run

    def _recursive(self) -> bool:
        return self._run.depth + 1 < self._run.rlm.max_depth

    def _record(self, prompts_: Sequence[Any], replies: Sequence[Any], times: SubCallTimes,
                cached: Sequence[bool] = ()) -> None:
        """Put the sub-queries' timing, prompts and replies in the trajectory (one event
        per call of llm_query or llm_query_batch, so a 10,000-item batch is one line).
        A call the cache answered is marked ``"cached": true``; with
        ``record_subcalls="none"`` only the timing is kept."""
        run = self._run
        fields = times.fields()
        if self._recursive():
            fields["child"] = True
        mode = run.rlm.record_subcalls
        if mode != "none":
            limit = SUBCALL_CAP_CHARS if mode == "capped" else None

            def keep(text: str) -> str:
                return text if limit is None else cap_text(text, limit)

            calls = [{"prompt": keep(prompt_text(p)), "reply": keep(_reply_text(r))}
                     for p, r in zip(prompts_, replies, strict=True)]
            for call, hit in zip(calls, cached, strict=False):
                if hit:
                    call["cached"] = True
            fields["calls"] = calls
        run.trajectory.emit("sub_queries", iteration=run.iterations, **fields)

    def _metered(self, times: SubCallTimes, index: int | None, usage: Usage, cached: bool,
                 error: BaseException | None) -> None:
        """A call on its own meter ended: its usage joins the run's and ``times`` (as item
        ``index``, or summed with the untimed calls when None)."""
        self._run.add_sub_usage(usage)
        if index is not None:
            model = next(iter(usage.by_model), "")
            times.item(index, tokens_in=usage.prompt_tokens, tokens_out=usage.completion_tokens,
                       usd=None if usage.unpriced_models else usage.cost_usd, model=model,
                       cached=cached, error=error)
            return
        _sum_usage(times, usage)
        times.tail_done(1)
        if error is not None:
            times.tail_failures(1)

    async def query(self, prompt: str, params: dict[str, Any]) -> Any:
        cached = [False]
        times = SubCallTimes(self._run.trajectory, 1)
        times.time_items(1)
        with self._run.tracking():
            try:
                reply = await self._query(prompt, params, cached, times)
            except LLMError as exc:
                if times.ms[0] is None or 0 not in times.failed:  # refused, or a mismatch
                    times.item(0, error=exc)
                self._record([prompt], [failed_slot(exc)], times)
                raise
        self._record([prompt], [reply], times, cached)
        return reply

    async def _query(self, prompt: str, params: dict[str, Any], cached: list[bool],
                     times: SubCallTimes) -> Any:
        run = self._run
        run.sub_calls += 1
        params = dict(params)
        check_budgetable(params)
        schema = await acheck_subquery_schema(params.pop("schema")) if "schema" in params else None
        oversized = self._oversized(prompt)
        if oversized is not None:
            raise oversized
        if self._recursive():
            try:
                reply = await self._child(prompt, schema)
            except LLMError as exc:
                times.item(0, error=exc)
                raise
            times.item(0)
            return reply
        if schema is not None:
            return await structured_query(functools.partial(self._send, times=times, index=0),
                                          prompt, schema, params, run.rlm.sub_client)
        return await self._send(prompt, params, cached, times=times, index=0)

    async def _send(self, prompt: Any, params: dict[str, Any],
                    cached: list[bool] | None = None, *, times: SubCallTimes,
                    index: int | None = None) -> str:
        """One model call on its own meter, recorded in ``times`` as item ``index`` (None:
        with the untimed calls, as a typed answer's re-asks are)."""
        run = self._run
        client = run.rlm.sub_client
        request = client.request(prompt, **{"model": run.rlm.recursive_model, **params})
        meter = run.new_sub_meter()
        hit = cached if cached is not None else [False]
        error: BaseException | None = None
        try:
            return await client.send(request, meter=meter, ledger=run.ledger, cached=hit)
        except LLMError as exc:
            error = self._window_error(prompt, exc)
            if error is exc:
                raise
            raise error from exc
        finally:
            usage = meter.snapshot()
            self._metered(times, index, usage, hit[0], error)
            run.note_rate_limits("sub", client, request.model, usage)

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
        times = SubCallTimes(self._run.trajectory, len(prompts))
        with self._run.tracking():
            replies = await self._batch(prompts, params, cached, times)
        self._record(prompts, replies, times, cached)
        return replies

    async def _batch(self, prompts: list[str], params: dict[str, Any],
                     cached: list[bool], times: SubCallTimes) -> list[Any]:
        run = self._run
        run.sub_calls += len(prompts)
        # Oversized prompts are answered here and never sent; the rest go out as one batch.
        refused = {i: err for i, p in enumerate(prompts) if (err := self._oversized(p)) is not None}
        if refused:
            kept = [i for i in range(len(prompts)) if i not in refused]
            marks = [False] * len(kept)
            sendable = [prompts[i] for i in kept]
            sent = iter(await self._send_batch(sendable, params, marks, times) if sendable else [])
            times.remap(kept, sorted(refused), len(prompts))
            for i, hit in zip(kept, marks, strict=True):
                cached[i] = hit
            return [failed_slot(refused[i]) if i in refused else next(sent) for i in range(len(prompts))]
        return await self._send_batch(prompts, params, cached, times)

    async def _send_batch(self, prompts: list[str], params: dict[str, Any],
                          cached: list[bool], times: SubCallTimes) -> list[str]:
        run = self._run
        total = len(prompts)
        params = dict(params)
        check_budgetable(params)
        schema = await acheck_subquery_schema(params.pop("schema")) if "schema" in params else None
        if self._recursive():
            results = await self._children(prompts, schema, times)
        elif schema is not None:
            results = await structured_batch(
                functools.partial(self._send, times=times),
                functools.partial(self._send_many, times=times, timed=0),
                prompts, schema, params, run.rlm.sub_client, self._progress(total),
            )
        else:
            results = await self._send_many(prompts, params, self._progress(total), cached,
                                            times=times)
        return [
            failed_slot(self._window_error(p, r) if isinstance(r, LLMError) else r)
            for p, r in zip(prompts, results, strict=True)
        ]

    async def _children(self, prompts: list[str], schema: Schema | None,
                        times: SubCallTimes) -> list[Any]:
        """A child run per prompt, all at once; each is timed (its usage is its own)."""
        times.time_items(len(prompts))

        async def child(i: int, prompt: str) -> Any:
            try:
                reply = await self._child(prompt, schema)
            except Exception as exc:
                times.item(i, error=exc)
                raise
            times.item(i)
            return reply

        return await asyncio.gather(*(child(i, p) for i, p in enumerate(prompts)),
                                    return_exceptions=True)

    async def _send_many(self, prompts: list[Any], params: dict[str, Any],
                         on_item_done: Callable[[int, int], None],
                         cached: list[bool] | None = None, *, times: SubCallTimes,
                         timed: int = TIMED_ITEMS) -> list[Any]:
        """Send ``prompts`` and return each reply or its exception, in order: the first
        ``timed`` one by one on meters of their own (a client batch reports its usage
        only as a whole), the rest as one batch of the client's."""
        run = self._run
        client = run.rlm.sub_client
        params = {"model": run.rlm.recursive_model, **params}
        requests = [client.request(p, **params) for p in prompts]
        total = len(requests)
        head = min(total, timed, run.subcalls_to_time())
        if total >= LARGE_BATCH:
            head = min(head, total - LARGE_BATCH)
        run.time_subcalls(head)
        if head:
            times.time_items(head)
        flags = cached if cached is not None else [False] * total
        done = [0, 0]  # answered so far: one by one, in the client's batch
        spent: list[Usage] = []  # each meter's usage, for the rate-limit note

        def report() -> None:
            on_item_done(done[0] + done[1], total)

        async def one(i: int) -> Any:
            meter = run.new_sub_meter()
            hit = [False]
            error: BaseException | None = None
            try:
                return await client.send(requests[i], meter=meter, ledger=run.ledger, cached=hit)
            except LLMError as exc:  # kept in its slot, as the client's batch does
                error = exc
                return exc
            finally:
                flags[i] = hit[0]
                spent.append(meter.snapshot())
                self._metered(times, i, spent[-1], hit[0], error)
                done[0] += 1
                report()

        async def rest() -> list[Any]:
            if head == total:
                return []
            meter = run.new_sub_meter()
            marks = [False] * (total - head)

            def progress(finished: int, _total: int) -> None:
                times.tail_done(finished - done[1])
                done[1] = finished
                report()

            replies: list[Any] = []
            try:
                replies = await client.send_many(requests[head:], meter=meter, ledger=run.ledger,
                                                 on_item_done=progress, cached=marks)
                return replies
            finally:
                flags[head:] = marks
                usage = meter.snapshot()
                spent.append(usage)
                run.add_sub_usage(usage)
                _sum_usage(times, usage)
                times.tail_failures(sum(isinstance(r, BaseException) for r in replies))

        *firsts, tail = await _all([one(i) for i in range(head)] + [rest()])
        run.note_rate_limits("sub", client, params["model"], sum(spent, Usage()))
        return [*firsts, *tail]

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


async def _all(coros: list[Coroutine[Any, Any, Any]]) -> list[Any]:
    """Await ``coros`` concurrently and return their results in order; when one raises,
    the others are cancelled (and waited for) before the error goes on."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _sum_usage(times: SubCallTimes, usage: Usage) -> None:
    """Add what untimed calls used, per model, to ``times``."""
    for model, row in usage.by_model.items():
        times.tail_usage(model, calls=row.calls, tokens_in=row.prompt_tokens,
                         tokens_out=row.completion_tokens,
                         usd=row.cost_usd if row.priced else None, cached=row.cached_calls)


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
