"""IPython integration: ``%load_ext rlm`` magics and the ``rlm repl`` shell.

``%rlm_config`` sets model, base URL and key for the notebook; ``%%rlm`` runs an RLM
with the cell body as the query. Sync calls work inside the kernel's running loop
because all I/O happens on rlm's engine loop; nothing patches asyncio.

``rlm repl`` is a terminal IPython shell with the root model's tools bound to one
client. Ctrl-C there cancels the requests in flight (sync calls and top-level awaits
alike) and waits for the cancellation to land, so the prompt comes back clean. What a
cell writes (a print of the context or of a reply, a traceback quoting either) reaches
the terminal through ``clean_text``: a document cannot write the clipboard, retitle the
window or hide text there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shlex
import sys
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from rlm import loop as engine
from rlm.cache import parse_cache_option
from rlm.display.formatting import clean_text
from rlm.errors import ConfigError, LLMError
from rlm.llm import AsyncOpenAIClient
from rlm.repl import ClientSubQueries, failed_slot
from rlm.schema import Schema

__all__ = ["NotebookConfig", "RLMMagics", "load_ipython_extension", "repl_namespace", "start_repl"]

T = TypeVar("T")

_SANDBOXES = ("local", "process")


@dataclass
class NotebookConfig:
    """What ``%rlm_config`` sets; unset values fall back to the environment."""

    model: str | None = None
    recursive_model: str | None = None
    base_url: str | None = None
    api_key: str | None = None
    sandbox: str | None = None
    cache: bool | str = False

    def api_key_or_env(self) -> str | None:
        """The key a run will use: the configured one, else OPENAI_API_KEY."""
        return self.api_key or os.environ.get("OPENAI_API_KEY") or None

    def describe(self) -> str:
        """One line for people; the key is masked so a saved notebook never leaks it."""
        key = self.api_key_or_env()
        return (
            f"model={self.model or os.environ.get('RLM_MODEL') or '(default)'} "
            f"recursive_model={self.recursive_model or '(same as model)'} "
            f"base_url={self.base_url or os.environ.get('OPENAI_BASE_URL') or '(OpenAI)'} "
            f"api_key={_mask(key)} sandbox={self.sandbox or '(default)'} "
            f"cache={_cache_text(self.cache)}"
        )


def _cache_text(cache: bool | str) -> str:
    if cache is True:
        return "on (the per-user cache directory)"
    return cache or "off"


def _mask(key: str | None) -> str:
    if not key:
        return "(not set)"
    # Short keys (local servers take any value) would be given away by a head and tail.
    return f"{key[:3]}...{key[-4:]}" if len(key) >= 12 else "***"


_CONFIG_OPTIONS = ("model", "recursive_model", "base_url", "api_key", "sandbox", "cache")
_RLM_OPTIONS = (
    "context", "model", "recursive_model", "base_url", "out", "max_iterations", "sandbox", "schema",
    "cache",
)
_RLM_FLAGS = ("verbose",)


def _parse_options(
    line: str, options: tuple[str, ...], flags: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``--name value``, ``--name=value``, ``name=value`` and ``--flag`` from a magic line.

    Raises IPython's ``UsageError``, which a shell shows as one line without a traceback.
    """
    known = ", ".join(f"--{n.replace('_', '-')}" for n in (*options, *flags))
    try:
        tokens = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"rlm: cannot parse {line!r}: {exc}") from None
    parsed: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("--"):
            name, eq, value = token[2:].partition("=")
        elif "=" in token:
            name, eq, value = token.partition("=")
        else:
            raise UsageError(f"rlm: unexpected argument {token!r}; options are {known}")
        name = name.replace("-", "_")
        if name in flags:
            if eq:
                raise UsageError(f"rlm: --{name} is a flag and takes no value")
            parsed[name] = True
        elif name in options:
            if not eq:
                if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                    raise UsageError(f"rlm: --{name.replace('_', '-')} needs a value")
                i += 1
                value = tokens[i]
            parsed[name] = value
        else:
            raise UsageError(f"rlm: unknown option --{name.replace('_', '-')}; options are {known}")
        i += 1
    sandbox = parsed.get("sandbox")
    if sandbox is not None and sandbox not in _SANDBOXES:
        raise UsageError(f"rlm: --sandbox must be one of {', '.join(_SANDBOXES)}, not {sandbox!r}")
    return parsed


@magics_class
class RLMMagics(Magics):
    """``%rlm_config`` and ``%%rlm``."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.config_values = NotebookConfig()

    @line_magic
    def rlm_config(self, line: str) -> None:
        """Set model, recursive_model, base_url, api_key, sandbox, cache; no arguments shows them.

        Values persist for the notebook's session and are used by every ``%%rlm`` cell;
        unset ones fall back to RLM_MODEL, OPENAI_BASE_URL and OPENAI_API_KEY. The key
        is shown masked. ``cache=on`` reuses replies from the per-user cache directory,
        ``cache=DIR`` from DIR, ``cache=off`` (the default) stores nothing.
        """
        for name, value in _parse_options(line, _CONFIG_OPTIONS).items():
            setattr(self.config_values, name,
                    parse_cache_option(value) if name == "cache" else value)
        print("rlm config:", self.config_values.describe())

    @cell_magic
    def rlm(self, line: str, cell: str) -> Any:
        """Run an RLM whose query is the cell body, over the notebook variable ``--context``.

        Options: ``--context VAR`` (default ``context``), ``--model``,
        ``--recursive-model``, ``--base-url``, ``--sandbox``, ``--max-iterations``,
        ``--cache on|off|DIR``,
        ``--verbose`` (show each iteration live), ``--out NAME`` (the variable that
        receives the RLMResult, ``_rlm`` by default) and ``--schema NAME`` (a notebook
        variable holding a schema: a pydantic model class, a type such as ``list[str]``
        or a JSON Schema dict; the validated answer is then ``result.output``). Unset
        options come from ``%rlm_config``. The RLMResult is the cell's output and
        renders as HTML.
        """
        from rlm.core import RLM

        options = _parse_options(line, _RLM_OPTIONS, _RLM_FLAGS)
        query = cell.strip()
        if not query:
            raise UsageError("rlm: the cell body is the query, and it is empty")
        name = options.get("context", "context")
        user_ns = self.shell.user_ns
        if name not in user_ns:
            raise UsageError(
                f"rlm: no variable named {name!r} in this notebook; define it first or "
                "pass --context VAR"
            )
        out = options.get("out", "_rlm")
        if not out.isidentifier():
            raise UsageError(f"rlm: --out needs a variable name, not {out!r}")
        schema = None
        if "schema" in options:
            schema_name = options["schema"]
            if schema_name not in user_ns:
                raise UsageError(
                    f"rlm: no variable named {schema_name!r} in this notebook; --schema takes the "
                    "name of a variable holding a pydantic model class, a type or a JSON Schema dict"
                )
            try:
                schema = Schema.of(user_ns[schema_name])
            except ConfigError as exc:
                raise UsageError(f"rlm: --schema {schema_name}: {exc}") from None
        try:
            max_iterations = int(options.get("max_iterations", 20))
        except ValueError:
            raise UsageError(
                f"rlm: --max-iterations needs a whole number, not {options['max_iterations']!r}"
            ) from None
        cfg = self.config_values
        # Checked here, before any work: a missing key would otherwise surface as a
        # failed RLMResult after the env had been built.
        if not cfg.api_key_or_env():
            raise UsageError(
                "rlm: no API key; run %rlm_config api_key=... or set OPENAI_API_KEY "
                "(a local server that needs none takes any value, e.g. api_key=local)"
            )
        try:
            rlm = RLM(
                model=options.get("model") or cfg.model,
                recursive_model=options.get("recursive_model") or cfg.recursive_model,
                base_url=options.get("base_url") or cfg.base_url,
                api_key=cfg.api_key,
                sandbox=options.get("sandbox") or cfg.sandbox,
                verbose=bool(options.get("verbose")),
                max_iterations=max_iterations,
                cache=(parse_cache_option(options["cache"]) if "cache" in options
                       else cfg.cache),
            )
        except ConfigError as exc:
            raise UsageError(f"rlm: {exc}") from None
        try:
            result = rlm.completion(context=user_ns[name], query=query, schema=schema)
        finally:
            rlm.close()
        user_ns[out] = result
        return result


def load_ipython_extension(ipython: Any) -> None:
    """Called by ``%load_ext rlm``: registers ``%rlm_config`` and ``%%rlm``."""
    ipython.register_magics(RLMMagics)


# -- rlm repl --------------------------------------------------------------------------

# How long Ctrl-C waits for cancelled requests to wind down before giving the prompt
# back; cancellation closes sockets, so this is milliseconds in practice.
_CANCEL_WAIT_S = 5.0


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C during an rlm call whose requests were cancelled; shown as one line."""


def _run_interruptibly(coro: Coroutine[Any, Any, T], what: str,
                       progress: Callable[[], str] | None = None) -> T:
    """Run ``coro`` on the engine loop; on Ctrl-C cancel it and wait until it has stopped.

    ``rlm.loop.run_sync`` cancels too, but returns at once: here the prompt comes back
    only once the requests are really gone, so what a person does next (or the server's
    counters) never races a batch that is still winding down.
    """
    started, finished = threading.Event(), threading.Event()

    async def tracked() -> T:
        started.set()
        try:
            return await coro
        finally:
            finished.set()

    future: concurrent.futures.Future[T] = engine.submit(tracked())
    try:
        return future.result()
    except KeyboardInterrupt:
        future.cancel()
        # Not started yet means nothing was sent: the cancel stops it before it runs.
        if started.is_set():
            finished.wait(_CANCEL_WAIT_S)
        detail = f" ({progress()})" if progress is not None else ""
        raise _Interrupted(f"{what} cancelled{detail}; nothing is left running") from None


def repl_namespace(context: Any, client: AsyncOpenAIClient) -> dict[str, Any]:
    """The names a person gets in ``rlm repl``: the same tools the root model gets.

    ``context``, ``client``, ``llm_query(prompt)``, ``llm_query_batch(prompts)`` and the
    awaitable ``llm_query_async`` / ``llm_query_batch_async``, all over ``client``. The
    person is trusted, so these are plain functions rather than a sandbox; as in REPL
    code, a failed batch item comes back as an ``"[llm_query error: ...]"`` string.
    Ctrl-C during a sync call cancels its requests before the prompt returns.
    """

    structured = ClientSubQueries(client)

    def llm_query(prompt: str, **params: Any) -> Any:
        """Ask the sub-model one question and return its reply (with ``schema=``, the
        parsed and validated value)."""
        _check_prompt("llm_query", prompt)
        if "schema" in params:
            return _run_interruptibly(structured.query(prompt, params), "llm_query")
        return _run_interruptibly(client.completion(prompt, **params), "llm_query")

    def llm_query_batch(prompts: list[str], **params: Any) -> list[Any]:
        """Ask many questions concurrently; replies in order, failures as error strings."""
        _check_prompts("llm_query_batch", prompts)
        if "schema" in params:
            return _run_interruptibly(structured.batch(list(prompts), params), "llm_query_batch")
        done = [0]

        def count(n: int, _total: int) -> None:
            done[0] = n

        results = _run_interruptibly(
            client.completion_batch(prompts, return_exceptions=True, on_item_done=count, **params),
            "llm_query_batch",
            lambda: f"{done[0]} of {len(prompts)} answered",
        )
        return [failed_slot(r) for r in results]

    async def llm_query_async(prompt: str, **params: Any) -> Any:
        """Awaitable ``llm_query``."""
        _check_prompt("llm_query_async", prompt)
        if "schema" in params:
            return await structured.query(prompt, params)
        return await client.completion(prompt, **params)

    async def llm_query_batch_async(prompts: list[str], **params: Any) -> list[Any]:
        """Awaitable ``llm_query_batch``."""
        _check_prompts("llm_query_batch_async", prompts)
        if "schema" in params:
            return await structured.batch(list(prompts), params)
        results = await client.completion_batch(prompts, return_exceptions=True, **params)
        return [failed_slot(r) for r in results]

    return {
        "context": context,
        "client": client,
        "llm_query": llm_query,
        "llm_query_batch": llm_query_batch,
        "llm_query_async": llm_query_async,
        "llm_query_batch_async": llm_query_batch_async,
    }


class ReplArgumentError(TypeError):
    """A wrong argument to ``llm_query`` & co. at the ``rlm repl`` prompt (shown in one line)."""


def _check_prompt(name: str, prompt: Any) -> None:
    # Checked here, in the person's own call: inside the client the same mistake surfaces
    # as a long traceback through the engine loop's futures.
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        return
    raise ReplArgumentError(
        f"{name}(prompt): prompt must be a str (or a list of chat message dicts), "
        f"got {type(prompt).__name__}; e.g. {name}(str(x))"
    )


def _check_prompts(name: str, prompts: Any) -> None:
    if isinstance(prompts, str) or not isinstance(prompts, list | tuple):
        raise ReplArgumentError(
            f"{name}(prompts): prompts must be a list of str, got {type(prompts).__name__}"
        )
    for i, prompt in enumerate(prompts):
        try:
            _check_prompt(name, prompt)
        except ReplArgumentError:
            raise ReplArgumentError(
                f"{name}(prompts): item {i} is a {type(prompt).__name__}, not a str"
            ) from None


class _CancellingRunner:
    """Runs the shell's top-level-await cells on one private loop.

    IPython's default runner lets Ctrl-C escape ``run_until_complete`` and leaves the
    cell's task pending, to resume (and finish its requests) in some later cell. This
    one cancels the task and runs the loop until the cancellation has gone through.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.interrupted = False

    def __call__(self, coro: Coroutine[Any, Any, T]) -> T:
        self.interrupted = False
        task = self.loop.create_task(coro)
        while True:
            try:
                return self.loop.run_until_complete(task)
            except KeyboardInterrupt:
                self.interrupted = True
                task.cancel()

    def close(self) -> None:
        self.loop.close()


def _short_interrupts(runner: _CancellingRunner) -> Callable[..., None]:
    """A custom-exception handler: one line for a Ctrl-C that rlm cleaned up after."""

    def handler(shell: Any, etype: type[BaseException], value: BaseException, tb: Any,
                tb_offset: int | None = None) -> None:
        # IPython ignores what a handler returns for exceptions raised by a cell, so
        # it prints; a full traceback through the loop machinery would only confuse.
        if isinstance(value, _Interrupted):
            print(f"KeyboardInterrupt: {clean_text(value)}")
        elif isinstance(value, ReplArgumentError | LLMError):
            # The person's mistake or the server's refusal: the message says it all.
            print(f"{type(value).__name__}: {clean_text(value)}")
        elif isinstance(value, asyncio.CancelledError) and runner.interrupted:
            print("KeyboardInterrupt: cancelled the awaited call and its requests")
        else:
            # A CancelledError of the user's own keeps IPython's usual traceback.
            shell.showtraceback((etype, value, tb), tb_offset=tb_offset)

    return handler


class _CleanStream:
    """A text stream that passes what is written through ``clean_text``. It says it is
    no terminal, so rich and IPython write plain text to it, not escape sequences it
    would show escaped."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(clean_text(text))
        return len(text)

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _clean_cell_output(shell: Any) -> None:
    """While each cell runs, its stdout and stderr go through ``_CleanStream``."""
    saved: list[tuple[Any, Any]] = []

    def before(_info: Any) -> None:
        saved.append((sys.stdout, sys.stderr))
        sys.stdout, sys.stderr = _CleanStream(sys.stdout), _CleanStream(sys.stderr)

    def after(_result: Any) -> None:
        if saved:
            sys.stdout, sys.stderr = saved.pop()

    shell.events.register("pre_run_cell", before)
    shell.events.register("post_run_cell", after)


def start_repl(context: Any, client: AsyncOpenAIClient) -> None:
    """Open an interactive IPython shell to explore ``context`` by hand (``rlm repl``).

    The namespace is ``repl_namespace(context, client)``; top-level ``await`` works;
    Ctrl-C cancels a running call and keeps the shell; Ctrl-D leaves. It starts its
    own terminal shell, so inside IPython or Jupyter push ``repl_namespace(...)`` into
    the running shell instead.
    """
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.terminal.interactiveshell import TerminalInteractiveShell

    if InteractiveShell.initialized():
        raise ConfigError(
            "start_repl opens its own IPython shell and one is already running here; use "
            "get_ipython().push(repl_namespace(context, client)) instead"
        )
    size = f"{len(context):,}" if hasattr(context, "__len__") else "?"
    where = client.base_url or "https://api.openai.com/v1"
    banner = (
        f"rlm repl: `context` is a {type(context).__name__} of length {size}.\n"
        "llm_query(prompt), llm_query_batch(prompts), await llm_query_async(prompt), "
        "await llm_query_batch_async(prompts)\n"
        f"model {client.model} at {where}; Ctrl-C cancels a running call; Ctrl-D exits.\n"
    )
    runner = _CancellingRunner()
    shell = TerminalInteractiveShell.instance(
        user_ns=repl_namespace(context, client), banner1=banner, banner2="", confirm_exit=False
    )
    # Tracebacks go through the cleaning stream too: coloured, they would show escaped.
    for formatter in (shell.InteractiveTB, shell.SyntaxTB):
        formatter.set_theme_name("nocolor")
    shell.loop_runner = runner
    shell.enable_tip = False  # IPython's random "Tip:" line under our banner
    shell.autoawait = True
    _clean_cell_output(shell)
    shell.set_custom_exc((_Interrupted, asyncio.CancelledError, ReplArgumentError, LLMError),
                         _short_interrupts(runner))
    try:
        shell.show_banner()
        shell.mainloop()
    finally:
        runner.close()
        TerminalInteractiveShell.clear_instance()
