"""One run of an RLM: its state, its lifecycle and the root loop that drives it.

A run starts (trajectory, budget ledger, REPLEnv with its sub-query service), loops
(one root completion per iteration; its ```repl blocks run in order and their cut
outputs go back as the next user message; long conversations are compacted; a typed
answer that does not match is sent back for a fix) and ends (an ``RLMResult`` and the
``run_end`` event, whatever happened). The loop is sequential; the fan-out happens
inside cells, through ``rlm.subqueries``. This module must not hold the RLM's
configuration or its public faces (``rlm.core``), the sub-query service, or prompt text
(``rlm.prompts``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rlm import prompts
from rlm.errors import BudgetExhaustedError, RLMError
from rlm.parsing import find_code_blocks, find_final_in_text
from rlm.repl import ExecResult, REPLEnv, describe_context
from rlm.result import RLMResult
from rlm.schema import Schema, SchemaIssue, format_issues
from rlm.subqueries import SUBCALL_CAP_CHARS, TIMED_ITEMS, SubQueryService
from rlm.trajectory import Trajectory, cap_text, prompt_text
from rlm.usage import BudgetLedger, Usage, UsageMeter, event_usage, outer_budget

if TYPE_CHECKING:
    # Annotations only: the RLM hands itself to a run; a run never imports it.
    from rlm.core import RLM

__all__ = [
    "DEFAULT_ROOT_WINDOW_TOKENS",
    "INTERRUPT_GRACE_S",
    "ActiveRuns",
    "Run",
    "new_env",
    "run_rlm",
    "short_error",
]

# Current frontier models take 128k tokens or more; compact well before that so the
# reply and the next cell output still fit.
DEFAULT_ROOT_WINDOW_TOKENS = 100_000
# Compaction keeps the system prompt, the first user message and this many latest
# messages (the last reply and the output it produced) verbatim.
_KEEP_RECENT = 2
# How long an interrupted run may take to stop its cell and write its record.
INTERRUPT_GRACE_S = 15.0


class _Stopped(RLMError):
    """Ends a run early: ``kind`` is its stopped_reason ("budget" or "interrupted")."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


class Run:
    """State of one root-loop run: its meters, counters, trajectory, budget and stop switch.

    Every run of one tree (a root run, its child runs, every env they own) shares one
    ``BudgetLedger``. ``halt`` stops the run from any thread: the running cell is
    interrupted (it returns what it printed), in-flight sub-queries are cancelled, and
    the loop ends at the end of that cell with the halt's reason.
    """

    def __init__(
        self,
        rlm: RLM,
        depth: int,
        trajectory: Trajectory,
        run_child: Callable[..., Coroutine[Any, Any, RLMResult]],
        ledger: BudgetLedger,
    ) -> None:
        self.rlm = rlm
        self.depth = depth
        # Starts a child run for recursive sub-queries; handed in because the sub-query
        # service that calls it sits below this module and must not import it.
        self.run_child = run_child
        self.trajectory = trajectory
        self.ledger = ledger
        self.root_meter = rlm.client.new_meter(on_retry=self._retry_shower("root"))
        self._show_sub_retry = self._retry_shower("sub")
        # Sub-calls are metered one by one (or one client batch at a time) on meters of
        # their own, so their timing and usage go into the trajectory; each joins here
        # when it ends.
        self._sub_usage = Usage()
        # Sub-calls of the running cell still to be sent (and timed) one by one.
        self._to_time = TIMED_ITEMS
        self.sub_calls = 0
        self.iterations = 0
        self.started = time.monotonic()
        self.children: list[Run] = []
        self.env: REPLEnv | None = None
        self.halted: _Stopped | None = None
        # Sub-query tasks in flight (on the engine loop), cancelled by halt().
        self._tasks: dict[asyncio.Task[Any], asyncio.AbstractEventLoop] = {}
        self._lock = threading.Lock()

    def new_sub_meter(self) -> UsageMeter:
        """A meter for one sub-call (or one client batch) of this run."""
        return self.rlm.sub_client.new_meter(on_retry=self._show_sub_retry)

    def add_sub_usage(self, usage: Usage) -> None:
        """Count a finished sub-call's (or client batch's) usage in this run's."""
        with self._lock:
            self._sub_usage = self._sub_usage + usage

    def sub_usage(self) -> Usage:
        """The usage of this run's own sub-calls that have ended (not its children's)."""
        with self._lock:
            return self._sub_usage

    def cell_started(self) -> None:
        """A cell starts: its first ``TIMED_ITEMS`` sub-calls are to be timed one by one."""
        self._to_time = TIMED_ITEMS

    def subcalls_to_time(self) -> int:
        """How many more sub-calls of the running cell are to be timed one by one (none in
        a Batch API job: a wave of sub-queries must reach the batch together, or a task
        replays once per call instead of once per wave)."""
        if self.rlm.sub_client.batch_route is not None:
            return 0
        return self._to_time

    def time_subcalls(self, n: int) -> None:
        """``n`` more sub-calls of the running cell are being timed one by one."""
        self._to_time -= n

    def usage(self) -> dict[str, Usage]:
        root, sub = self.root_meter.snapshot(), self.sub_usage()
        for child in self.children:
            child_usage = child.usage()
            # A child's root and sub calls are all sub-work from this run's view.
            sub = sub + child_usage["root"] + child_usage["sub"]
        return {"root": root, "sub": sub}

    def total_sub_calls(self) -> int:
        return self.sub_calls + sum(c.total_sub_calls() for c in self.children)

    def _retry_shower(self, role: str) -> Callable[[Any], None]:
        # Retries go to live displays as they happen (transient: a 429 storm would
        # otherwise write thousands of log lines); ``note_rate_limits`` logs the sum.
        def show(notice: Any) -> None:
            self.trajectory.emit("retry", role=role, model=notice.model, failure=notice.failure,
                                 attempt=notice.attempt, wait_s=round(notice.wait_s, 3),
                                 refusal=notice.refusal)
        return show

    def note_rate_limits(self, role: str, client: Any, model: str, spent: Usage) -> None:
        """Record that rate limits held this run back, if they did: the refusals drawn,
        the seconds calls waited, and the limits pacing followed for ``model``."""
        if not (spent.rate_limit_hits or spent.rate_limit_wait_s):
            return
        limits = client.rate_limits().get(model)
        self.trajectory.emit("rate_limited", role=role, model=model,
                             refusals=spent.rate_limit_hits,
                             waited_s=round(spent.rate_limit_wait_s, 3),
                             limits=None if limits is None else limits.to_dict())

    @contextlib.contextmanager
    def tracking(self) -> Any:
        """Register the current task as one of this run's sub-queries while it runs."""
        task = asyncio.current_task()
        if task is None:
            yield
            return
        with self._lock:
            self._tasks[task] = asyncio.get_running_loop()
        try:
            if self.halted is not None:
                raise BudgetExhaustedError(f"the run was stopped ({self.halted})")
            yield
        finally:
            with self._lock:
                self._tasks.pop(task, None)

    def halt(self, kind: str, reason: str) -> None:
        """Stop the run now (any thread): interrupt its cell, cancel its sub-queries."""
        if self.halted is None:
            self.halted = _Stopped(kind, reason)
        env = self.env
        if env is not None:
            env.interrupt(reason)
        with self._lock:
            tasks = list(self._tasks.items())
        for task, loop in tasks:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nothing runs there
                loop.call_soon_threadsafe(task.cancel)
        for child in list(self.children):
            child.halt(kind, reason)

    def check_stop(self) -> None:
        """Raise ``_Stopped`` if the run was halted or its budget is spent."""
        if self.halted is not None:
            raise self.halted
        ledger = self.ledger
        if ledger.exhausted is not None or (
            ledger.deadline is not None and ledger.remaining_s() <= 0
        ):
            if ledger.exhausted is None:
                ledger.time_up()
            raise _Stopped("budget", ledger.describe())


class ActiveRuns:
    """The top-level runs of one RLM still going, so ``interrupt`` and ``close`` reach
    them from any thread."""

    def __init__(self) -> None:
        self._runs: set[Run] = set()
        self._lock = threading.Lock()

    def add(self, run: Run) -> None:
        with self._lock:
            self._runs.add(run)

    def discard(self, run: Run) -> None:
        with self._lock:
            self._runs.discard(run)

    def __bool__(self) -> bool:
        return bool(self._runs)

    def halt_all(self, kind: str, reason: str) -> None:
        """``Run.halt`` every run listed now."""
        with self._lock:
            runs = list(self._runs)
        for run in runs:
            run.halt(kind, reason)

    def wait_idle(self, timeout: float) -> None:
        """Block until no run is listed, or ``timeout`` seconds have passed."""
        deadline = time.monotonic() + timeout
        while self._runs and time.monotonic() < deadline:
            time.sleep(0.01)


def _estimate_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    # About 4 characters a token for English text and code; a few tokens per message.
    return sum(len(str(m.get("content") or "")) for m in messages) // 4 + 4 * len(messages)


def _deadline_passed(run: Run) -> None:
    ledger = run.ledger
    ledger.time_up()  # this run's deadline, or an earlier one of the job it belongs to
    run.halt("budget", ledger.describe())


def _emit_cell_result(run: Run, iteration: int, index: int, result: ExecResult,
                      cached_sub_calls: int = 0) -> None:
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
        cached_sub_calls=cached_sub_calls,
        truncated=result.truncated,
    )


def short_error(exc: BaseException) -> str:
    """The message of a run's failure as results carry it: at most 200 characters."""
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _trajectory(rlm: RLM, depth: int, parent: Run | None) -> Trajectory:
    sinks: list[Callable[[dict[str, Any]], None]] = []
    if parent is not None:
        sinks = list(parent.trajectory.sinks)
    else:
        if rlm.verbose:
            from rlm.display import LiveDisplay

            sinks.append(LiveDisplay())
        if rlm.on_event is not None:
            sinks.append(rlm.on_event)
        if rlm.tracing:
            from rlm.tracing import trace_sink

            sinks.append(trace_sink())
    log_dir = rlm.log_dir if depth == 0 else None
    trajectory = Trajectory(log_dir=log_dir, depth=depth, sinks=sinks)
    if parent is not None:
        # A child's events also land in the parent's log, so one file tells all.
        parent_traj = parent.trajectory
        # Offsets a child records itself (t0) move to the parent's clock, as ``t`` does.
        shift = parent_traj.now() - trajectory.now()

        def forward(event: dict[str, Any]) -> None:
            fields = {
                k: v for k, v in event.items() if k not in ("type", "t", "run_id", "child_run")
            }
            if isinstance(fields.get("t0"), float | int):
                fields["t0"] = round(fields["t0"] + shift, 4)
            # A grandchild's event already names its run: keep the deepest one.
            parent_traj.emit(
                event["type"], child_run=event.get("child_run") or event["run_id"], **fields
            )

        trajectory.sinks = [forward]
    return trajectory


async def run_rlm(
    rlm: RLM,
    *,
    context: Any,
    query: str,
    depth: int,
    parent: Run | None = None,
    env: REPLEnv | None = None,
    history: Sequence[tuple[str, str]] = (),
    schema: Schema | None = None,
    on_end: Callable[[RLMResult], None] | None = None,
    active: ActiveRuns | None = None,
) -> RLMResult:
    """One run of ``rlm`` over ``context``: start it, drive the root loop, end it.

    It never raises for a failed run (the result says why) except to let a
    cancellation go on, after the run's record is written. A child run (``parent``
    given) spends from its parent's ledger and logs into its parent's trajectory; a
    top-level run is listed in ``active`` while it goes, so ``RLM.interrupt`` reaches
    it, and ends at the ledger's deadline. ``on_end`` is handed the result before
    a cancellation goes on.
    """
    trajectory = _trajectory(rlm, depth, parent)
    if parent is not None:
        ledger = parent.ledger  # children spend from what is left
    else:
        ledger = BudgetLedger(
            max_tokens=rlm.max_tokens,
            max_cost_usd=rlm.max_cost_usd,
            max_time_s=rlm.max_time_s,
            prices={**rlm.client.prices, **rlm.sub_client.prices, **rlm.prices},
            parent=outer_budget(),  # a job's ledger, when this run is one of its tasks
        )
    run = Run(rlm, depth, trajectory, functools.partial(run_rlm, rlm), ledger)
    if parent is not None:
        parent.children.append(run)
    own_env = env is None
    answer: str | None = None
    stopped = "error"
    error: str | None = None
    iterations = 0
    cancelled = False
    typed = _TypedAnswer(schema, rlm.max_answer_retries) if schema is not None else None
    timer: asyncio.TimerHandle | None = None
    if parent is None:
        if active is not None:
            active.add(run)
        remaining = ledger.remaining_s()
        if remaining is not None:
            timer = asyncio.get_running_loop().call_later(
                max(0.0, remaining), _deadline_passed, run
            )
    try:
        description = describe_context(context)
        trajectory.emit(
            "run_start",
            query=query,
            context=description,
            model=rlm.model,
            recursive_model=rlm.recursive_model,
            sandbox=rlm.sandbox,
            # A child's context is the prompt its parent sent: show that, not the
            # generic child instruction in ``query``.
            **({"prompt": _recorded(rlm, prompt_text(context))}
               if depth and rlm.record_subcalls != "none" else {}),
            max_iterations=rlm.max_iterations,
            max_depth=rlm.max_depth,
            schema=schema.json_schema if schema is not None else None,
            tools=sorted(rlm.tools),
            started_at=round(trajectory.started_at, 6),
            parent_run=parent.trajectory.run_id if parent is not None else None,
        )
        if env is None:
            # Starting (and closing) an env may block on a worker; keep the loop free.
            env = await asyncio.to_thread(new_env, rlm, context, SubQueryService(run))
        else:
            env.set_sub_queries(SubQueryService(run))
        run.env = env
        run.check_stop()
        answer, stopped, iterations = await _loop(run, env, description, query, history, typed)
        if stopped == "invalid_answer" and typed is not None:
            error = typed.error_text()
    except _Stopped as exc:
        stopped, error = exc.kind, str(exc)
    except BudgetExhaustedError as exc:
        # Another ledger may have refused the call (a batch-mode job's): say whose.
        stopped, error = "budget", ledger.describe() if ledger.exhausted else str(exc)
    except asyncio.CancelledError:
        # Cancelled from outside (task.cancel, Ctrl-C through run_sync): write the
        # record, then let the cancellation go on.
        cancelled = True
        run.halt("interrupted", "the run was interrupted")
        assert run.halted is not None
        stopped, error = run.halted.kind, str(run.halted)
    except Exception as exc:  # noqa: BLE001 - a run never raises; the result says why
        if run.halted is not None:  # e.g. the client closed under a halted run
            stopped, error = run.halted.kind, str(run.halted)
        else:
            stopped, error = "error", short_error(exc)
    finally:
        if timer is not None:
            timer.cancel()
        if own_env and env is not None:
            await asyncio.to_thread(env.close)
    if stopped in ("budget", "interrupted"):
        trajectory.emit(stopped, reason=error)
    elif stopped == "error":
        trajectory.emit("error", message=error)
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
    if typed is not None:
        result.output = typed.output if answer is not None else None
        if stopped == "invalid_answer":
            result.raw_output = typed.raw
            result.validation_errors = [i.to_dict() for i in typed.issues]
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
    if active is not None:
        active.discard(run)
    if on_end is not None:
        on_end(result)
    if cancelled:
        raise asyncio.CancelledError
    return result


def _recorded(rlm: RLM, text: str) -> str:
    return text if rlm.record_subcalls == "full" else cap_text(text, SUBCALL_CAP_CHARS)


def new_env(rlm: RLM, context: Any, sub_queries: SubQueryService | None = None) -> REPLEnv:
    """A REPLEnv over ``context`` configured like ``rlm``'s runs (sandbox, its worker
    pool, cell timeout, output cap, tools), its sub-queries served by ``sub_queries``."""
    pooled = {"worker_pool": rlm.worker_pool} if rlm.worker_pool is not None else {}
    return REPLEnv(
        context=context,
        sandbox=rlm.sandbox,
        timeout=rlm.cell_timeout,
        max_output_chars=rlm.max_output_chars,
        tools=rlm.tools or None,
        sub_queries=sub_queries,
        **pooled,
    )


async def _root_turn(run: Run, messages: list[dict[str, Any]], iteration: int,
                     new: list[dict[str, Any]]) -> str:
    run.trajectory.emit("root_request", iteration=iteration, messages=new)
    before = run.root_meter.snapshot()
    started = time.monotonic()
    rlm = run.rlm
    client = rlm.client
    reply = await client.send(client.request(messages, model=rlm.model), meter=run.root_meter,
                              ledger=run.ledger)
    turn = run.root_meter.snapshot() - before
    run.note_rate_limits("root", client, rlm.model, turn)
    run.trajectory.emit(
        "root_reply",
        iteration=iteration,
        model=next(iter(turn.by_model), rlm.model),
        content=reply,
        usage=event_usage(turn),
        elapsed_s=round(time.monotonic() - started, 3),
        cached=turn.cached_calls > 0,
    )
    return reply


async def _loop(
    run: Run,
    env: REPLEnv,
    description: str,
    query: str,
    history: Sequence[tuple[str, str]],
    typed: _TypedAnswer | None = None,
) -> tuple[str | None, str, int]:
    rlm = run.rlm
    first = prompts.FIRST_USER_TEMPLATE.format(description=description, query=query)
    if history:
        lines = "\n".join(f"- Q: {q}\n  A: {a}" for q, a in history)
        first = prompts.HISTORY_TEMPLATE.format(history=lines) + "\n" + first
    system = rlm.system_prompt_for(env)
    if typed is not None:
        system += prompts.SCHEMA_SECTION.format(schema=typed.schema.prompt_text())
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": system},
        {"role": "user", "content": first},
    ]
    new = messages[:]
    for iteration in range(1, rlm.max_iterations + 1):
        run.iterations = iteration
        run.check_stop()
        messages = await _maybe_compact(run, messages, iteration)
        reply = await _root_turn(run, messages, iteration, new)
        messages.append({"role": "assistant", "content": reply})
        run.check_stop()
        blocks = find_code_blocks(reply)
        if not blocks:
            final = await _final_from_text(run, env, reply)
            if final is not None:
                verdict, feedback = await _judge(run, typed, final, iteration)
                if verdict == "answer":
                    return _answer_text(final, typed), "final", iteration
                if verdict == "invalid":
                    return None, "invalid_answer", iteration
                new = [{"role": "user", "content": feedback}]
                messages.extend(new)
                continue
            new = [{"role": "user", "content": prompts.NO_CODE_TEMPLATE}]
            messages.extend(new)
            continue
        outputs: list[str] = []
        for index, code in enumerate(blocks):
            result = await _cell(run, env, iteration, index, code)
            feedback = ""
            if result.final is not None:
                run.trajectory.emit("final", answer=result.final, source="code")
                verdict, feedback = await _judge(run, typed, result.final, iteration)
                if verdict == "answer":
                    return _answer_text(result.final, typed), "final", iteration
                if verdict == "invalid":
                    return None, "invalid_answer", iteration
            outputs.append(
                prompts.format_cell_output(
                    index, result.stdout, result.stderr, result.error, rlm.max_output_chars
                )
            )
            run.check_stop()
            if feedback:
                # The rest of this reply was written for an answer that was refused.
                outputs.append(feedback)
                break
        new = [
            {"role": "user", "content": prompts.NEXT_USER_TEMPLATE.format(outputs="\n\n".join(outputs))}
        ]
        messages.extend(new)
    # Out of iterations: one last turn asks for the answer.
    new = [{"role": "user", "content": prompts.LAST_TURN_PROMPT}]
    messages.extend(new)
    run.check_stop()
    reply = await _root_turn(run, messages, rlm.max_iterations + 1, new)
    final = await _final_from_text(run, env, reply)
    if final is None:
        final = reply.strip()
        run.trajectory.emit("final", answer=final, source="last_turn")
    if typed is not None:
        # No turn is left to fix a mismatch: it ends the run.
        if (await _judge(run, typed, final, rlm.max_iterations + 1, last=True))[0] != "answer":
            return None, "invalid_answer", rlm.max_iterations
        return typed.answer, "max_iterations", rlm.max_iterations
    return _answer_text(final, None), "max_iterations", rlm.max_iterations


async def _judge(
    run: Run, typed: _TypedAnswer | None, value: Any, iteration: int, last: bool = False
) -> tuple[str, str]:
    """What a FINAL value means for the run: ("answer", ""), ("retry", the feedback
    for the root) or ("invalid", "") when no retry is left."""
    if typed is None or await typed.accept(value):
        return "answer", ""
    left = 0 if last else typed.retries_left()
    run.trajectory.emit(
        "answer_invalid",
        iteration=iteration,
        attempt=typed.failures,
        retries_left=left,
        errors=[i.to_dict() for i in typed.issues],
    )
    if left <= 0:
        return "invalid", ""
    return "retry", prompts.INVALID_ANSWER_TEMPLATE.format(
        issues=format_issues(typed.issues), left=left, plural="s" if left != 1 else ""
    )


async def _maybe_compact(
    run: Run, messages: list[dict[str, Any]], iteration: int
) -> list[dict[str, Any]]:
    """Replace older turns by a root-written summary once the conversation is too long.

    The system prompt, the first user message (description and query) and the last
    reply with its output stay verbatim; the summary joins the first user message so
    roles still alternate. The REPL is untouched, so variables named in the summary
    still hold their values.
    """
    rlm = run.rlm
    limit = rlm.root_window_tokens
    if limit is None or len(messages) <= 2 + _KEEP_RECENT:
        return messages
    before = _estimate_tokens(messages)
    if before <= limit:
        return messages
    head, recent = messages[:2], messages[-_KEEP_RECENT:]
    request = [*messages[:-_KEEP_RECENT], {"role": "user", "content": prompts.COMPACTION_PROMPT}]
    usage_before = run.root_meter.snapshot()
    asked = run.trajectory.now()
    client = rlm.client
    summary = await client.send(client.request(request, model=rlm.model), meter=run.root_meter,
                                ledger=run.ledger)
    spent = run.root_meter.snapshot() - usage_before
    first = dict(head[1])
    first["content"] = (
        f"{head[1]['content']}\n\n{prompts.COMPACTED_TEMPLATE.format(summary=summary.strip())}"
    )
    compacted = [head[0], first, *recent]
    run.trajectory.emit(
        "compaction",
        iteration=iteration,
        t0=asked,
        model=next(iter(spent.by_model), rlm.model),
        messages_before=len(messages),
        messages_after=len(compacted),
        tokens_before=before,
        tokens_after=_estimate_tokens(compacted),
        summary=summary,
        usage=event_usage(spent),
    )
    return compacted


async def _cell(run: Run, env: REPLEnv, iteration: int, index: int, code: str) -> ExecResult:
    """Run one cell and record it; an interruption still records what it printed."""
    run.trajectory.emit("cell", iteration=iteration, index=index, code=code)
    run.cell_started()
    cached_before = run.sub_usage().cached_calls
    # Shielded, so a cancelled run can stop the cell and still read its output.
    task = asyncio.ensure_future(env.aexecute(code))
    try:
        result = await asyncio.shield(task)
    except asyncio.CancelledError:
        run.halt("interrupted", "the run was interrupted")
        with contextlib.suppress(BaseException):
            _emit_cell_result(run, iteration, index,
                              await asyncio.wait_for(asyncio.shield(task), INTERRUPT_GRACE_S))
        raise
    _emit_cell_result(run, iteration, index, result,
                      run.sub_usage().cached_calls - cached_before)
    if env.closed:
        raise _Stopped("interrupted", "the REPL was closed during the run")
    return result


async def _final_from_text(run: Run, env: REPLEnv, reply: str) -> Any:
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


class _TypedAnswer:
    """One run's typed answer: the schema, the attempts so far and the last verdict."""

    def __init__(self, schema: Schema, max_retries: int) -> None:
        self.schema = schema
        self.max_retries = max_retries
        self.failures = 0
        self.raw: Any = None
        self.output: Any = None
        self.answer: str | None = None
        self.issues: tuple[SchemaIssue, ...] = ()

    async def accept(self, value: Any) -> bool:
        """Validate a FINAL value (in a validation thread: the loop stays free); on
        success keep the output and its answer text."""
        self.raw = value
        verdict = await self.schema.avalidate_answer(value)
        if verdict.ok:
            self.output = verdict.output
            self.answer = verdict.output if isinstance(verdict.output, str) else self.schema.dumps(verdict.output)
            self.issues = ()
            return True
        self.failures += 1
        self.issues = verdict.issues
        return False

    def retries_left(self) -> int:
        return self.max_retries - self.failures + 1

    def error_text(self) -> str:
        first = str(self.issues[0]) if self.issues else "no value"
        tries = self.failures
        return (
            f"the answer did not match the schema after {tries} attempt{'s' if tries != 1 else ''} "
            f"({first}); the last value is in raw_output, the issues in validation_errors"
        )


def _answer_text(value: Any, typed: _TypedAnswer | None) -> str:
    """RLMResult.answer for a FINAL value: the validated output's text with a schema;
    without one, a str as is and other plain data as JSON."""
    if typed is not None:
        assert typed.answer is not None
        return typed.answer
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)
