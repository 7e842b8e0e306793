"""Typed errors for misuse of the library and for failed model calls.

Faults inside executed REPL code never raise: they land in ``ExecResult.error``.
Everything here is about the library itself or the remote model, and each message
says what to do next.
"""

from __future__ import annotations

from typing import Any


class RLMError(Exception):
    """Base class of every error rlm raises on purpose."""


class ConfigError(RLMError):
    """Missing or invalid configuration: no API key, unknown option, bad value."""


class LoopError(RLMError):
    """A sync call was made where it would deadlock (on the engine loop's own thread)."""


class EnvClosedError(RLMError):
    """A REPLEnv (or client) was used after ``close()``."""


class ClientClosedError(RLMError):
    """An AsyncOpenAIClient was used after ``close()``."""


class LLMError(RLMError):
    """A model call failed after the retries it was allowed.

    ``status`` is the HTTP status when there was one, ``attempts`` how many requests
    were sent in all, ``retry_after`` the seconds the server asked to wait before the
    next try (None: it did not say).
    """

    def __init__(
        self, message: str, *, status: int | None = None, attempts: int = 1,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.attempts = attempts
        self.retry_after = retry_after


class LLMTimeoutError(LLMError):
    """The model did not answer within the client's timeout, on every attempt."""


class RateLimitError(LLMError):
    """The endpoint kept answering 429 until the retries ran out."""


class LLMConnectionError(LLMError):
    """The endpoint could not be reached, or dropped the connection, on every attempt.

    ``refused`` is True when no connection could be made at all (nothing listening,
    an unknown host), as when a local server is not running.
    """

    def __init__(self, message: str, *, refused: bool = False, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.refused = refused


class RequestTooLargeError(LLMError):
    """A request can never fit the model's tokens-per-minute limit, so it was not sent."""


class ResponseError(LLMError):
    """The endpoint answered with something that is not a valid chat completion."""


class BudgetExhaustedError(LLMError):
    """A model call was not sent because the run's budget (tokens, cost or time) is spent.

    Raised before sending, never after: a call that was already in flight finishes and
    counts. Inside REPL code a batch slot shows it as
    ``[llm_query error: budget exhausted (max_tokens=...)]``.
    """


class UnpricedModelError(BudgetExhaustedError):
    """A model call was not sent because a cost budget is set and its model has no price,
    so its cost could not be counted against the budget."""


class RunInterrupted(KeyboardInterrupt):
    """A sync ``RLM.completion`` was interrupted (Ctrl-C, or SIGTERM in ``rlm run``).

    It is a KeyboardInterrupt, so a script stops as usual. The run stopped its cell and
    wrote its record first; ``result`` is that RLMResult (``stopped_reason
    "interrupted"``, usage and sub-calls so far, ``log_path``), or None if the run could
    not finish writing in time.
    """

    def __init__(self, result: Any = None) -> None:
        super().__init__("the run was interrupted")
        self.result = result


class BatchError(RLMError):
    """Some items of a batch failed; nothing is lost.

    ``results`` holds every item in order (``None`` where it failed) and ``errors``
    maps the index of each failed item to its exception.
    """

    def __init__(self, results: list[Any], errors: dict[int, BaseException]) -> None:
        self.results = results
        self.errors = errors
        first = min(errors)
        super().__init__(
            f"{len(errors)} of {len(results)} batch items failed "
            f"(first: item {first}: {errors[first]}); the successful results are in "
            "`.results`, the failures in `.errors`; pass return_exceptions=True to get "
            "them inline instead"
        )


class SandboxError(RLMError):
    """The sandbox itself (not the user's code) could not run: a worker would not start."""


class TaskInputError(ConfigError):
    """A job's task input is unusable: a missing file, a malformed line, a duplicate id."""


class OutputFileError(ConfigError):
    """A job's output file cannot be resumed: a line other than the last is not JSON."""


class AccessDeniedError(RLMError):
    """A server was asked to read a path outside the directories it was allowed to read."""


class SessionError(RLMError):
    """A REPL session request a server cannot serve: an unknown id, too many sessions."""
