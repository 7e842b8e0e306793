"""RLM: the root loop, budgets, recursion, sessions and many tasks at once.

The root model never sees the context: it sees a description of it and drives a
REPLEnv where the context is a variable. Each iteration is one root completion; its
```repl blocks run in order and their (cut) outputs go back as the next user message.
The loop is sequential; the fan-out happens inside cells, through the sub-query
service below, which every env of a run (and every child run) shares with one client
and one limiter.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlm import loop as engine
from rlm import prompts
from rlm.errors import ConfigError, LLMError, RLMError
from rlm.llm import AsyncOpenAIClient, Usage
from rlm.parsing import find_code_blocks, find_final_in_text
from rlm.repl import REPLEnv, describe_context, failed_slot
from rlm.trajectory import Trajectory

if TYPE_CHECKING:
    from rlm.jobs.runner import JobSummary


@dataclass
class RLMResult:
    """The outcome of one run.

    ``stopped_reason`` is "final" (the code called FINAL/FINAL_VAR, or the root wrote
    one), "max_iterations" (the last-turn answer), "budget" (a cost, token or time
    budget ran out: ``error`` says which) or "error" (``error`` says what failed).
    ``usage`` has "root" and "sub" ``Usage`` snapshots of this run alone.
    """

    answer: str | None
    iterations: int = 0
    elapsed_s: float = 0.0
    usage: dict[str, Usage] = field(default_factory=lambda: {"root": Usage(), "sub": Usage()})
    sub_calls: int = 0
    stopped_reason: str = "final"
    error: str | None = None
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    log_path: str | None = None

    @property
    def ok(self) -> bool:
        """True when the run produced an answer without an error."""
        return self.answer is not None and self.error is None

    @property
    def total_usage(self) -> Usage:
        """Root and sub-model usage added up."""
        return self.usage["root"] + self.usage["sub"]

    def __repr__(self) -> str:
        answer = self.answer if self.answer is None or len(self.answer) <= 80 else self.answer[:77] + "..."
        total = self.total_usage
        extra = f", error={self.error!r}" if self.error else ""
        return (
            f"RLMResult(answer={answer!r}, stopped_reason={self.stopped_reason!r}, "
            f"iterations={self.iterations}, sub_calls={self.sub_calls}, "
            f"tokens={total.total_tokens}, cost_usd={total.cost_usd:.4f}, "
            f"elapsed_s={self.elapsed_s:.2f}{extra})"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the trajectory is left out; it is in ``log_path``)."""
        return {
            "answer": self.answer,
            "stopped_reason": self.stopped_reason,
            "error": self.error,
            "iterations": self.iterations,
            "sub_calls": self.sub_calls,
            "elapsed_s": round(self.elapsed_s, 3),
            "usage": {k: v.to_dict() for k, v in self.usage.items()},
            "log_path": self.log_path,
        }

    def _repr_html_(self) -> str:
        from rlm.display import result_html

        return result_html(self)

    def __rich__(self) -> Any:
        from rlm.display import result_rich

        return result_rich(self)


class _BudgetExceeded(RLMError):
    pass


class _Run:
    """State of one root-loop run: its meters, counters, trajectory and budgets."""

    def __init__(self, rlm: RLM, depth: int, trajectory: Trajectory) -> None:
        self.rlm = rlm
        self.depth = depth
        self.trajectory = trajectory
        self.root_meter = rlm.client._new_meter()  # noqa: SLF001
        self.sub_meter = rlm.sub_client._new_meter()  # noqa: SLF001
        self.sub_calls = 0
        self.iterations = 0
        self.started = time.monotonic()
        self.children: list[_Run] = []

    def usage(self) -> dict[str, Usage]:
        root, sub = self.root_meter.snapshot(), self.sub_meter.snapshot()
        for child in self.children:
            child_usage = child.usage()
            # A child's root and sub calls are all sub-work from this run's view.
            sub = sub + child_usage["root"] + child_usage["sub"]
        return {"root": root, "sub": sub}

    def total_sub_calls(self) -> int:
        return self.sub_calls + sum(c.total_sub_calls() for c in self.children)

    def check_budget(self) -> None:
        rlm = self.rlm
        if rlm.max_time_s is not None and time.monotonic() - self.started > rlm.max_time_s:
            raise _BudgetExceeded(f"max_time_s={rlm.max_time_s:g} reached")
        if rlm.max_cost_usd is None and rlm.max_tokens is None:
            return
        usage = self.usage()
        total = usage["root"] + usage["sub"]
        if rlm.max_cost_usd is not None and total.cost_usd > rlm.max_cost_usd:
            raise _BudgetExceeded(
                f"max_cost_usd={rlm.max_cost_usd:g} exceeded (spent {total.cost_usd:.4f} USD)"
            )
        if rlm.max_tokens is not None and total.total_tokens > rlm.max_tokens:
            raise _BudgetExceeded(
                f"max_tokens={rlm.max_tokens} exceeded (used {total.total_tokens})"
            )


class _SubQueryService:
    """What ``llm_query`` and friends call, for one run: counts, meters, progress, recursion.

    At depth < max_depth a sub-query is a child RLM run on the prompt (its own REPLEnv,
    the same clients and limiter); at the last depth it is a plain model call.
    """

    def __init__(self, run: _Run) -> None:
        self._run = run

    async def query(self, prompt: str, params: dict[str, Any]) -> str:
        run = self._run
        run.sub_calls += 1
        if run.depth + 1 < run.rlm.max_depth:
            return await self._child(prompt)
        client = run.rlm.sub_client
        body = client._body(prompt, {"model": run.rlm.recursive_model, **params})  # noqa: SLF001
        return await client._on_engine(client._complete(body, run.sub_meter))  # noqa: SLF001

    async def batch(self, prompts: list[str], params: dict[str, Any]) -> list[str]:
        run = self._run
        run.sub_calls += len(prompts)
        total = len(prompts)
        if run.depth + 1 < run.rlm.max_depth:
            results = await asyncio.gather(
                *(self._child(p) for p in prompts), return_exceptions=True
            )
        else:
            client = run.rlm.sub_client
            bodies = [
                client._body(p, {"model": run.rlm.recursive_model, **params})  # noqa: SLF001
                for p in prompts
            ]
            step = max(1, total // 50)
            emit = run.trajectory.emit

            def progress(done: int, total_: int) -> None:
                if done == total_ or done % step == 0:
                    emit("subcalls", done=done, total=total_)

            results = await client._on_engine(  # noqa: SLF001
                client._batch(bodies, True, progress, run.sub_meter)  # noqa: SLF001
            )
        return [failed_slot(r) for r in results]

    async def _child(self, prompt: str) -> str:
        run = self._run
        child = await run.rlm._run(  # noqa: SLF001
            context=prompt, query=prompts.CHILD_QUERY, depth=run.depth + 1, parent=run
        )
        if child.answer is None:
            raise LLMError(f"the child RLM found no answer ({child.error or child.stopped_reason})")
        return child.answer


def _short_error(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _default_sandbox() -> str:
    # The worker-process sandbox needs fork and OS limits: Linux and macOS.
    return "process" if sys.platform.startswith(("linux", "darwin")) else "local"


class RLM:
    """A Recursive Language Model: a root model driving a sandboxed REPL over the context.

    ``model`` (the root) falls back to RLM_MODEL; ``recursive_model`` (what
    ``llm_query`` calls) to ``model``. ``client`` and ``sub_client`` may be passed in
    and shared between RLMs; otherwise they are built from ``base_url``/``api_key``
    (falling back to OPENAI_BASE_URL/OPENAI_API_KEY), the sub client with
    ``max_concurrency`` in flight. Budgets (``max_cost_usd``, ``max_tokens``,
    ``max_time_s``) stop a run with ``stopped_reason="budget"``. ``log_dir`` keeps a
    JSONL trajectory per run; ``verbose`` shows each iteration live.
    """

    def __init__(
        self,
        model: str | None = None,
        recursive_model: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        max_iterations: int = 20,
        max_depth: int = 1,
        sandbox: str | None = None,
        max_output_chars: int = 20_000,
        max_cost_usd: float | None = None,
        max_tokens: int | None = None,
        max_time_s: float | None = None,
        log_dir: str | Path | None = None,
        verbose: bool = False,
        system_prompt: str | None = None,
        tools: Mapping[str, Callable[..., Any]] | None = None,
        client: AsyncOpenAIClient | None = None,
        sub_client: AsyncOpenAIClient | None = None,
        max_concurrency: int = 64,
        cell_timeout: float = 60.0,
        sub_window_chars: int = 100_000,
    ) -> None:
        if not isinstance(max_iterations, int) or max_iterations < 1:
            raise ConfigError(f"max_iterations must be an int >= 1, got {max_iterations!r}")
        if not isinstance(max_depth, int) or max_depth < 1:
            raise ConfigError(f"max_depth must be an int >= 1, got {max_depth!r}")
        if sandbox is not None and sandbox not in ("local", "process"):
            raise ConfigError(f"sandbox must be 'local' or 'process', got {sandbox!r}")
        self._owned: list[AsyncOpenAIClient] = []
        if client is None:
            client = AsyncOpenAIClient(model=model, api_key=api_key, base_url=base_url)
            self._owned.append(client)
        self.client = client
        self.model = model or client.model
        self.recursive_model = recursive_model or self.model
        if sub_client is None:
            sub_client = AsyncOpenAIClient(
                model=self.recursive_model,
                api_key=api_key,
                base_url=base_url or client.base_url,
                max_concurrency=max_concurrency,
            )
            self._owned.append(sub_client)
        self.sub_client = sub_client
        self.max_iterations = max_iterations
        self.max_depth = max_depth
        self.sandbox = sandbox or _default_sandbox()
        self.max_output_chars = max_output_chars
        self.max_cost_usd = max_cost_usd
        self.max_tokens = max_tokens
        self.max_time_s = max_time_s
        self.log_dir = log_dir
        self.verbose = verbose
        self.system_prompt = system_prompt or prompts.SYSTEM_PROMPT.format(sub_window=f"{sub_window_chars:,}")
        self.tools = dict(tools or {})
        self.cell_timeout = cell_timeout

    def __repr__(self) -> str:
        return (
            f"RLM(model={self.model!r}, recursive_model={self.recursive_model!r}, "
            f"sandbox={self.sandbox!r}, max_iterations={self.max_iterations}, max_depth={self.max_depth})"
        )

    # -- public API -------------------------------------------------------------------

    def completion(self, context: Any, query: str) -> RLMResult:
        """Answer ``query`` over ``context`` (sync; works inside a running loop too)."""
        return engine.run_sync(self.acompletion(context, query))

    async def acompletion(self, context: Any, query: str) -> RLMResult:
        """Answer ``query`` over ``context``; never raises for a failed run (see ``error``)."""
        _check_query(query)
        return await self._run(context=context, query=query, depth=0)

    async def acompletion_batch(
        self,
        tasks: Iterable[tuple[Any, str] | Mapping[str, Any]],
        max_concurrent: int = 8,
        progress: bool = True,
    ) -> list[RLMResult]:
        """Run many (context, query) tasks at once, each in its own REPLEnv, in order.

        All tasks share this RLM's clients and limiter. A failed task is an RLMResult
        with ``error`` set and ``stopped_reason="error"``; it never stops the others.
        ``progress`` shows a bar with done, failed and ETA.
        """
        items: list[tuple[Any, str]] = []
        for task in tasks:
            if isinstance(task, Mapping):
                items.append((task.get("context"), task["query"]))
            else:
                context, query = task
                items.append((context, query))
        for _, query in items:
            _check_query(query)
        bar = None
        if progress and items:
            from rlm.display import BatchProgress

            bar = BatchProgress()
            bar.start(len(items))
        gate = asyncio.Semaphore(max(1, max_concurrent))

        async def one(context: Any, query: str) -> RLMResult:
            async with gate:
                try:
                    result = await self._run(context=context, query=query, depth=0)
                except Exception as exc:  # noqa: BLE001 - one task's failure is its own
                    result = RLMResult(answer=None, stopped_reason="error", error=_short_error(exc))
            if bar is not None:
                bar.advance(result.error is None)
            return result

        try:
            return list(await asyncio.gather(*(one(c, q) for c, q in items)))
        finally:
            if bar is not None:
                bar.stop()

    def run_job(self, tasks: Any, out: str | Path, **options: Any) -> JobSummary:
        """Run a many-document job: every task not yet in ``out`` is run and appended to it.

        ``tasks`` is a JSONL or CSV file, a directory of documents (with ``query=``), or
        an iterable of ``rlm.jobs.Task`` or mappings ``{"id", "query", "context" |
        "context_path"}``. Each finished task is one fsynced line of ``out``; running
        the same job again skips ids already there (``retry_failed=True`` re-runs those
        that ended in error). Options: ``query``, ``fmt``, ``encoding``,
        ``concurrency`` (8), job caps ``max_cost_usd``/``max_tokens``/``max_time_s``,
        ``sort_output``, ``progress``, ``backend`` ("local" or "ray") and
        ``ray_address``. Returns a ``JobSummary``; see the README's "Jobs" section.
        """
        from rlm.jobs.runner import run_job

        return run_job(self, tasks, out, **options)

    async def arun_job(self, tasks: Any, out: str | Path, **options: Any) -> JobSummary:
        """``run_job`` for async code: the job's tasks run on the caller's event loop."""
        from rlm.jobs.runner import arun_job

        return await arun_job(self, tasks, out, **options)

    def session(self, context: Any) -> RLMSession:
        """A multi-turn session over ``context``: the REPL keeps its state across asks."""
        return RLMSession(self, context)

    async def aclose(self) -> None:
        """Close the clients this RLM created (not ones passed in)."""
        for c in self._owned:
            await c.close()

    def close(self) -> None:
        """``aclose`` for sync code."""
        for c in self._owned:
            c.close_sync()

    def __enter__(self) -> RLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> RLM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the loop ---------------------------------------------------------------------

    def _trajectory(self, depth: int, parent: _Run | None) -> Trajectory:
        sinks: list[Callable[[dict[str, Any]], None]] = []
        if parent is not None:
            sinks = list(parent.trajectory.sinks)
        elif self.verbose:
            from rlm.display import LiveDisplay

            sinks.append(LiveDisplay())
        log_dir = self.log_dir if depth == 0 else None
        trajectory = Trajectory(log_dir=log_dir, depth=depth, sinks=sinks)
        if parent is not None:
            # A child's events also land in the parent's log, so one file tells all.
            parent_traj = parent.trajectory

            def forward(event: dict[str, Any]) -> None:
                fields = {
                    k: v for k, v in event.items() if k not in ("type", "t", "run_id", "child_run")
                }
                # A grandchild's event already names its run: keep the deepest one.
                parent_traj.emit(
                    event["type"], child_run=event.get("child_run") or event["run_id"], **fields
                )

            trajectory.sinks = [forward]
        return trajectory

    async def _run(
        self,
        *,
        context: Any,
        query: str,
        depth: int,
        parent: _Run | None = None,
        env: REPLEnv | None = None,
        history: Sequence[tuple[str, str]] = (),
    ) -> RLMResult:
        trajectory = self._trajectory(depth, parent)
        run = _Run(self, depth, trajectory)
        if parent is not None:
            parent.children.append(run)
        own_env = env is None
        answer: str | None = None
        stopped = "error"
        error: str | None = None
        iterations = 0
        try:
            description = describe_context(context)
            trajectory.emit(
                "run_start",
                query=query,
                context=description,
                model=self.model,
                recursive_model=self.recursive_model,
                sandbox=self.sandbox,
                max_iterations=self.max_iterations,
                max_depth=self.max_depth,
            )
            if env is None:
                # Starting (and closing) an env may block on a worker; keep the loop free.
                env = await asyncio.to_thread(self._new_env, context, _SubQueryService(run))
            else:
                env._set_sub_queries(_SubQueryService(run))  # noqa: SLF001
            answer, stopped, iterations = await self._loop(run, env, description, query, history)
        except _BudgetExceeded as exc:
            stopped, error = "budget", str(exc)
            trajectory.emit("budget", reason=error)
        except Exception as exc:  # noqa: BLE001 - a run never raises; the result says why
            stopped, error = "error", _short_error(exc)
            trajectory.emit("error", message=error)
        finally:
            if own_env and env is not None:
                await asyncio.to_thread(env.close)
        usage = run.usage()
        result = RLMResult(
            answer=answer,
            iterations=iterations or run.iterations,
            elapsed_s=time.monotonic() - run.started,
            usage=usage,
            sub_calls=run.total_sub_calls(),
            stopped_reason=stopped,
            error=error,
            trajectory=trajectory.events,
            log_path=str(trajectory.log_path) if trajectory.log_path else None,
        )
        trajectory.emit(
            "run_end",
            answer=answer,
            stopped_reason=stopped,
            iterations=result.iterations,
            elapsed_s=round(result.elapsed_s, 3),
            sub_calls=result.sub_calls,
            usage={k: v.to_dict() for k, v in usage.items()},
            error=error,
        )
        trajectory.close()
        return result

    def _new_env(self, context: Any, sub_queries: _SubQueryService | None = None) -> REPLEnv:
        return REPLEnv(
            context=context,
            sandbox=self.sandbox,
            timeout=self.cell_timeout,
            max_output_chars=self.max_output_chars,
            tools=self.tools or None,
            sub_queries=sub_queries,
        )

    async def _root_turn(self, run: _Run, messages: list[dict[str, Any]], iteration: int,
                         new: list[dict[str, Any]]) -> str:
        run.trajectory.emit("root_request", iteration=iteration, messages=new)
        before = run.root_meter.snapshot()
        started = time.monotonic()
        client = self.client
        body = client._body(messages, {"model": self.model})  # noqa: SLF001
        reply = await client._on_engine(client._complete(body, run.root_meter))  # noqa: SLF001
        turn = run.root_meter.snapshot() - before
        run.trajectory.emit(
            "root_reply",
            iteration=iteration,
            content=reply,
            usage={
                "prompt_tokens": turn.prompt_tokens,
                "completion_tokens": turn.completion_tokens,
                "cost_usd": turn.cost_usd,
            },
            elapsed_s=round(time.monotonic() - started, 3),
        )
        return reply

    async def _loop(
        self,
        run: _Run,
        env: REPLEnv,
        description: str,
        query: str,
        history: Sequence[tuple[str, str]],
    ) -> tuple[str | None, str, int]:
        first = prompts.FIRST_USER_TEMPLATE.format(description=description, query=query)
        if history:
            lines = "\n".join(f"- Q: {q}\n  A: {a}" for q, a in history)
            first = prompts.HISTORY_TEMPLATE.format(history=lines) + "\n" + first
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": first},
        ]
        new = messages[:]
        for iteration in range(1, self.max_iterations + 1):
            run.iterations = iteration
            run.check_budget()
            reply = await self._root_turn(run, messages, iteration, new)
            messages.append({"role": "assistant", "content": reply})
            run.check_budget()
            blocks = find_code_blocks(reply)
            if not blocks:
                final = await self._final_from_text(run, env, reply)
                if final is not None:
                    return final, "final", iteration
                new = [{"role": "user", "content": prompts.NO_CODE_TEMPLATE}]
                messages.extend(new)
                continue
            outputs: list[str] = []
            for index, code in enumerate(blocks):
                run.trajectory.emit("cell", iteration=iteration, index=index, code=code)
                result = await env.aexecute(code)
                run.trajectory.emit(
                    "cell_result",
                    iteration=iteration,
                    index=index,
                    stdout=result.stdout,
                    stderr=result.stderr,
                    error=result.error,
                    final=result.final,
                    duration_s=round(result.duration_s, 4),
                    sub_calls=result.sub_calls,
                    truncated=result.truncated,
                )
                if result.final is not None:
                    run.trajectory.emit("final", answer=result.final, source="code")
                    return result.final, "final", iteration
                outputs.append(
                    prompts.format_cell_output(
                        index, result.stdout, result.stderr, result.error, self.max_output_chars
                    )
                )
                run.check_budget()
            new = [
                {"role": "user", "content": prompts.NEXT_USER_TEMPLATE.format(outputs="\n\n".join(outputs))}
            ]
            messages.extend(new)
        # Out of iterations: one last turn asks for the answer.
        new = [{"role": "user", "content": prompts.LAST_TURN_PROMPT}]
        messages.extend(new)
        run.check_budget()
        reply = await self._root_turn(run, messages, self.max_iterations + 1, new)
        final = await self._final_from_text(run, env, reply)
        if final is None:
            final = reply.strip()
            run.trajectory.emit("final", answer=final, source="last_turn")
        return final, "max_iterations", self.max_iterations

    async def _final_from_text(self, run: _Run, env: REPLEnv, reply: str) -> str | None:
        found = find_final_in_text(reply)
        if found is None:
            return None
        if found.kind == "FINAL":
            run.trajectory.emit("final", answer=found.value, source="text")
            return found.value
        result = await env.aexecute(f"FINAL_VAR({found.value!r})")
        if result.final is not None:
            run.trajectory.emit("final", answer=result.final, source="text FINAL_VAR")
            return result.final
        return None


class RLMSession:
    """Multi-turn work over one context: one REPLEnv kept across ``ask`` calls.

    Each ask is a fresh root conversation that is told the earlier questions and
    answers; the REPL keeps every variable, so later asks build on earlier work.
    """

    def __init__(self, rlm: RLM, context: Any) -> None:
        self.rlm = rlm
        self.context = context
        self.history: list[tuple[str, str]] = []
        # Each ask gives the env that run's sub-query service.
        self.env = rlm._new_env(context)  # noqa: SLF001

    def ask(self, query: str) -> RLMResult:
        """Ask the next question (sync; works inside a running loop too)."""
        return engine.run_sync(self.aask(query))

    async def aask(self, query: str) -> RLMResult:
        """Ask the next question."""
        _check_query(query)
        result = await self.rlm._run(  # noqa: SLF001
            context=self.context, query=query, depth=0, env=self.env, history=self.history
        )
        if result.answer is not None:
            self.history.append((query, result.answer))
        return result

    def close(self) -> None:
        """Close the session's REPL."""
        self.env.close()

    def __enter__(self) -> RLMSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_query(query: Any) -> None:
    if not isinstance(query, str) or not query.strip():
        raise ConfigError("query must be a non-empty str")

