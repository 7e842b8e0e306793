"""The ``rlm`` command: run, batch, demo, view, repl, cache, serve, mcp and bench.

Exit codes:

- 0: the run ended with a final answer (``FINAL``/``FINAL_VAR`` or a final line).
- 1: the run failed: no answer (an error, a spent budget).
- 2: bad usage, said in one line on stderr: a missing, unreadable or undecodable file,
  a file that is not a trajectory, a missing key, a bad option or value.
- 3: the run hit ``--max-iterations`` before a final answer; stdout still carries the
  root model's last-turn answer and stderr says so (the answer is a best guess).
- 130: interrupted (Ctrl-C); 143: terminated (SIGTERM). The run still writes its
  record (the interrupted cell's output, a final ``run_end``), and one stderr line says
  what was interrupted, what it cost and where the log is.

Data goes to stdout (the answer, the JSON result); everything for a person (the live
view, the progress line, warnings) goes to stderr, so ``rlm run ... > out`` and
``rlm run --json | jq`` always get clean data.

``rlm batch`` exits 0 when every task succeeded, 1 when some failed or were not run, 2
for bad usage (a duplicate task id too), 130/143 when interrupted (the output stays valid).
``rlm bench run`` exits the same way, counting (task, length, method, seed) cells.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from rlm.version import package_version

if TYPE_CHECKING:
    from rlm.usage import Price

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_MAX_ITERATIONS = 0, 1, 2, 3
# 128 + the signal's number, as shells report it.
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


class UsageError(Exception):
    """Bad input on the command line: printed, exit code 2."""


def self_command() -> str:
    """How to call this command again, as the user can type it from here.

    After ``make demo`` the ``rlm`` script sits in ``.venv/bin`` and is not on PATH, so a
    hint that says ``rlm view ...`` would not work as printed: name the script by the
    path it was started with unless PATH finds the same one.
    """
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "rlm"
    if argv0.endswith(".py"):  # python -m rlm (or -m rlm.cli)
        return f"{_short_path(sys.executable)} -m rlm"
    on_path = shutil.which("rlm")
    if on_path and os.path.exists(argv0) and os.path.samefile(on_path, argv0):
        return "rlm"
    if os.sep not in argv0:
        return argv0
    return _short_path(argv0)


def _short_path(path: str) -> str:
    absolute = os.path.abspath(path)
    try:
        relative = os.path.relpath(absolute)
    except ValueError:  # another drive on Windows
        return absolute
    if relative.startswith(os.pardir):
        return absolute
    return relative if os.sep in relative else "." + os.sep + relative


def _check_encoding(encoding: str) -> str:
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise UsageError(
            f"--encoding {encoding}: unknown text encoding (try utf-8, latin-1 or cp1252)"
        ) from None


def _check_log_dir(log_dir: str | None) -> None:
    """Fail before the context is loaded (it may be large) when the log dir is unusable."""
    if log_dir is not None:
        _check_writable_dir("--log-dir", log_dir)


def _check_writable_dir(flag: str, directory: str) -> None:
    """Create ``directory`` if needed and prove it writable, or say why not in one line."""
    path = Path(directory).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {directory}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UsageError(f"{flag} {directory}: cannot write there ({exc.strerror or exc})") from None


def _check_output_file(flag: str, out: str) -> Path:
    path = Path(out)
    if path.is_dir():
        raise UsageError(f"{flag} {out}: is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{flag} {out}: the directory {parent} does not exist")
    return path


def _read_context(source: str, fmt: str, encoding: str, allow_empty: bool = False) -> Any:
    if source == "-":
        raw = sys.stdin.buffer.read()
        name = "standard input"
    else:
        path = Path(source)
        if not path.exists():
            raise UsageError(f"context file not found: {source}")
        if path.is_dir():
            raise UsageError(f"context must be a file, not a directory: {source}")
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {source}: {exc.strerror or exc}") from None
        name = source
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{name} is not valid {encoding} text (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}); convert it to text first or pass --encoding (e.g. latin-1)"
        ) from exc
    if not text.strip() and not allow_empty:
        raise UsageError(
            f"{name} is empty: there is nothing to answer over (pass --allow-empty to run anyway)"
        )
    if fmt == "auto":
        suffix = Path(source).suffix.lower() if source != "-" else ""
        fmt = {".json": "json", ".jsonl": "jsonl"}.get(suffix, "text")
    try:
        if fmt == "json":
            return json.loads(text)
        if fmt == "jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise UsageError(f"{name} is not valid {fmt.upper()}: {exc}") from exc
    return text


def _require_key(api_key: str | None, model: str | None = None,
                 recursive_model: str | None = None) -> str:
    """The root model's key: --api-key, else its provider's variable (OPENAI_API_KEY for a
    bare model name, ANTHROPIC_API_KEY for anthropic/..., and so on). A sub model on
    another provider must find its own provider's variable set."""
    from rlm.llm import DEFAULT_MODEL
    from rlm.providers import adapter_class, resolve_model

    provider, _ = resolve_model(model or os.environ.get("RLM_MODEL") or DEFAULT_MODEL)
    env = adapter_class(provider).key_env
    key = api_key or os.environ.get(env)
    if not key:
        raise UsageError(
            f"no API key: set {env} or pass --api-key (for a local server that needs "
            "none, pass any value, e.g. --api-key local)"
        )
    if recursive_model:
        # A sub model on another provider takes its key from that provider's variable.
        sub_provider, _ = resolve_model(recursive_model)
        sub_env = adapter_class(sub_provider).key_env
        if sub_provider != provider and not os.environ.get(sub_env):
            raise UsageError(
                f"no API key for the sub model {recursive_model}: set {sub_env} (and "
                f"--endpoint {sub_provider}=URL for an endpoint other than its default)"
            )
    return key


def _endpoints(args: argparse.Namespace) -> dict[str, dict[str, str]] | None:
    """--endpoint PROVIDER=URL (repeatable): where a model of that provider is sent when
    it is not the root's (the root's is --base-url); keys come from the environment."""
    from rlm.errors import ConfigError
    from rlm.providers import check_endpoints

    table: dict[str, str] = {}
    for spec in getattr(args, "endpoint", None) or ():
        provider, sep, url = spec.partition("=")
        if not sep or not url.startswith(("http://", "https://")):
            raise UsageError(f"--endpoint takes PROVIDER=URL such as "
                             f"openai=http://localhost:8000/v1, got {spec!r}")
        table[provider.strip()] = url.strip()
    try:
        return check_endpoints(table) or None
    except ConfigError as exc:
        raise UsageError(f"--endpoint: {exc}") from None


def _read_schema(source: str) -> dict[str, Any]:
    """A JSON Schema file for ``rlm run --schema``, checked before any request."""
    from rlm.errors import ConfigError
    from rlm.schema import Schema

    path = Path(source)
    if not path.is_file():
        raise UsageError(f"schema file not found: {source}")
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{source} is not valid JSON: {exc}") from exc
    if not isinstance(schema, dict):
        raise UsageError(f"{source} must hold a JSON Schema object, not a JSON {type(schema).__name__}")
    try:
        Schema.of(schema)
    except ConfigError as exc:
        raise UsageError(f"{source}: {exc}") from exc
    return schema


def _print_result(result: Any, args: argparse.Namespace, *, view_shown_answer: bool,
                  typed: bool = False) -> int:
    if args.json:
        data = result.to_dict()
        # The sum of root and sub, as the servers' replies carry it.
        data["usage"]["total"] = result.total_usage.to_dict()
        print(json.dumps(data, indent=2, ensure_ascii=False))
    elif typed and result.answer is not None:
        # The validated output as JSON (a str output too, quoted), so it pipes into jq.
        print(json.dumps(result.to_dict()["output"], indent=2, ensure_ascii=False))
    elif result.answer is not None and not view_shown_answer:
        print(result.answer)
    # A run sets `error` only when it ends without an answer (see RLM._run).
    if result.answer is None:
        from rlm.display.formatting import clean_text

        # The error can quote a model reply or the document: shown inert on the terminal.
        print(f"rlm: run failed ({result.stopped_reason}): {clean_text(result.error)}",
              file=sys.stderr)
        return EXIT_FAILED
    if result.stopped_reason == "max_iterations":
        print(
            f"rlm: stopped at the iteration limit (--max-iterations {args.max_iterations}) before a "
            "final answer; the answer is the root model's last-turn reply (exit code 3)",
            file=sys.stderr,
        )
        return EXIT_MAX_ITERATIONS
    return EXIT_OK


@contextlib.contextmanager
def _priced_for_budget(args: argparse.Namespace, flag: str) -> Iterator[None]:
    """Say in flags why the cost budget ``flag`` was refused: a model without a price.

    The library refuses ``max_cost_usd`` over an unpriced model in the words of its
    Python API; on the command line the fix is ``--price`` or ``--prices``. Any other
    ConfigError passes through as it is.
    """
    from rlm.errors import ConfigError

    try:
        yield
    except ConfigError:
        if getattr(args, flag.removeprefix("--").replace("-", "_"), None) is None:
            raise
        from rlm.llm import DEFAULT_MODEL
        from rlm.providers import resolve_model
        from rlm.usage import lookup_price, resolve_prices

        table = {resolve_model(k)[1]: v for k, v in resolve_prices(_prices(args)).items()}
        root = args.model or os.environ.get("RLM_MODEL") or DEFAULT_MODEL
        for role, model in (("root", root), ("sub", args.recursive_model or root)):
            if lookup_price(table, resolve_model(model)[1]) is None:
                raise UsageError(
                    f"{flag} needs a price for the {role} model {model!r} (without one its cost "
                    f"would count as $0): pass --price {model}=IN,OUT (USD per 1M input and "
                    "output tokens) or --prices FILE.json"
                ) from None
        raise


def _build_rlm(args: argparse.Namespace, rlm_class: Any, *, budget_prefix: str, verbose: bool,
               **extra: Any) -> Any:
    # One place turns the shared model/endpoint/budget flags into an RLM (run and batch).
    budgets = {
        name: getattr(args, budget_prefix + name, None)
        for name in ("max_cost_usd", "max_tokens", "max_time_s")
    }
    flag = "--" + (budget_prefix + "max_cost_usd").replace("_", "-")
    with _priced_for_budget(args, flag):
        return rlm_class(**_rlm_options(args, verbose), **budgets, **extra)


def _rlm_options(args: argparse.Namespace, verbose: bool) -> dict[str, Any]:
    return dict(
        model=args.model,
        recursive_model=args.recursive_model,
        base_url=args.base_url,
        api_key=_require_key(args.api_key, args.model, getattr(args, "recursive_model", None)),
        endpoints=_endpoints(args),
        max_iterations=args.max_iterations,
        max_depth=args.max_depth,
        sandbox=args.sandbox,
        log_dir=args.log_dir,
        verbose=verbose,
        prices=_prices(args),
        limits=_limits(args),
    )


def _limits(args: argparse.Namespace) -> dict[str, dict[str, float]] | None:
    """--rpm/--tpm (every model) then --limit MODEL=rpm:N,tpm:N (repeatable, later wins)."""
    from rlm.pacing import parse_limit

    table: dict[str, dict[str, float]] = {}
    every = {k: v for k in ("rpm", "tpm") if (v := getattr(args, k, None)) is not None}
    if every:
        table["*"] = every
    for spec in getattr(args, "limit", None) or ():
        model, pair = parse_limit(spec)
        table[model] = {**table.get(model, {}), **pair}
    return table or None


def _prices(args: argparse.Namespace) -> dict[str, Price]:
    """--prices FILE.json (repeatable) then --price MODEL=IN,OUT (repeatable), later wins."""
    from rlm.usage import load_prices_file, parse_price

    table: dict[str, Price] = {}
    for path in getattr(args, "prices", None) or ():
        table.update(load_prices_file(path))
    for spec in getattr(args, "price", None) or ():
        model, pair = parse_price(spec)
        table[model] = pair
    return table


class _TerminatedRun(KeyboardInterrupt):
    """SIGTERM during ``rlm run``, delivered like Ctrl-C so the run stops its cell and
    writes its record before the process exits."""


def _raise_terminated_run(signum: int, frame: Any) -> None:
    raise _TerminatedRun


def _interrupted_line(result: Any, what: str) -> str:
    """The one stderr line for an interrupted run: what, what it cost, where the log is."""
    if result is None:
        return f"rlm: interrupted by {what}; the run did not finish writing its record"
    usage = result.total_usage
    log = result.log_path or "none (pass --log-dir to keep one)"
    return (
        f"rlm: interrupted by {what} in iteration {result.iterations} after "
        f"{result.sub_calls:,} sub-calls; spent {usage.cost_text} ({usage.total_tokens:,} "
        f"tokens); log: {log}"
    )


class _Tracing:
    """``rlm run``'s tracing: whether runs are traced, and the SDK it set up (if any)."""

    def __init__(self, wanted: bool | None, shutdown: Callable[[], Any] | None = None) -> None:
        self.wanted = wanted
        self._shutdown = shutdown

    def flush(self) -> None:
        """Send what is left and stop the SDK this command set up."""
        if self._shutdown is not None:
            self._shutdown()
            self._shutdown = None


def _start_tracing(flag: bool) -> _Tracing:
    """--trace (or RLM_TRACING): trace the run, setting an SDK up when none is."""
    from rlm.errors import ConfigError
    from rlm.tracing import configure_sdk, tracing_wanted

    try:
        if not tracing_wanted(True if flag else None):
            return _Tracing(None)
        return _Tracing(True, configure_sdk())
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def cmd_run(args: argparse.Namespace) -> int:
    encoding = _check_encoding(args.encoding)
    _check_log_dir(args.log_dir)
    _require_key(args.api_key, args.model, getattr(args, "recursive_model", None))
    schema = _read_schema(args.schema) if args.schema else None
    context = _read_context(args.context, args.context_format, encoding, args.allow_empty)
    if not args.query.strip():
        raise UsageError("--query is empty: ask a question")
    from rich.console import Console

    from rlm.core import RLM

    # The person-facing view goes to stderr: stdout carries only the answer or the JSON.
    view: Any = None
    if args.verbose:
        from rlm.display import LiveDisplay

        view = LiveDisplay(Console(stderr=True))
    elif sys.stderr.isatty():
        from rlm.display.progress import RunProgress

        view = RunProgress(Console(stderr=True))
    import signal

    from rlm.errors import RunInterrupted

    tracing = _start_tracing(args.trace)
    rlm = _build_rlm(args, RLM, budget_prefix="", verbose=False, on_event=view,
                     max_concurrency=args.max_concurrency, tracing=tracing.wanted,
                     **_cache_options(args))
    previous = signal.signal(signal.SIGTERM, _raise_terminated_run)
    try:
        result = rlm.completion(context=context, query=args.query, schema=schema)
    except RunInterrupted as exc:
        terminated = isinstance(exc.__cause__, _TerminatedRun)
        if view is not None:
            view.close()
            view = None
        print(_interrupted_line(exc.result, "SIGTERM" if terminated else "SIGINT"),
              file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
        rlm.close()
        if view is not None:
            view.close()
        tracing.flush()
    # The live view's answer panel is on the terminal already when both streams are it.
    shown = bool(args.verbose) and sys.stdout.isatty() and sys.stderr.isatty()
    return _print_result(result, args, view_shown_answer=shown, typed=schema is not None)


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so the job stops the way Ctrl-C stops it."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated


def _batch_settings(args: argparse.Namespace) -> Any:
    """The --batch-* flags as BatchSettings (False without --batch-api)."""
    given = [flag for flag, value, default in (
        ("--batch-window-s", args.batch_window_s, 10.0),
        ("--batch-fallback-after-s", args.batch_fallback_after_s, None),
        ("--batch-max-tries", args.batch_max_tries, 3),
        ("--batch-poll-s", args.batch_poll_s, 1.0)) if value != default]
    if not args.batch_api:
        if given:
            raise UsageError(f"{given[0]} needs --batch-api")
        return False
    if args.backend == "ray":
        raise UsageError("--batch-api runs on the local backend; leave out --backend ray")
    from rlm.batchapi import BatchSettings

    return BatchSettings(window_s=args.batch_window_s,
                         fallback_after_s=args.batch_fallback_after_s,
                         max_tries=args.batch_max_tries, poll_min_s=args.batch_poll_s,
                         poll_max_s=max(60.0, args.batch_poll_s))


def cmd_batch(args: argparse.Namespace) -> int:
    import signal

    from rlm.core import RLM
    from rlm.jobs import load_tasks

    if args.tasks is None and isinstance(args.cache, str) and Path(args.cache).is_file():
        # --cache takes an optional DIR, so `--cache tasks.jsonl` ate the tasks file.
        raise UsageError(f"--cache took {args.cache} as its cache directory; put the tasks "
                         "file before --cache, or write --cache=DIR")
    if (args.tasks is None) == (args.dir is None):
        raise UsageError("give a tasks file (JSONL or CSV) or --dir DOCS/, not both or neither")
    if args.dir is not None and not args.query:
        raise UsageError("--dir needs --query (the question to ask of every document)")
    if args.dir is not None and not Path(args.dir).is_dir():
        raise UsageError(f"--dir {args.dir}: " + ("not a directory" if Path(args.dir).exists()
                                                   else "directory not found"))
    batch_api = _batch_settings(args)
    if args.backend == "ray" and (args.ray_address or "").startswith("ray://"):
        _check_ray_client(args.ray_address)
    schema = _read_schema(args.schema) if args.schema else None
    tasks = load_tasks(args.dir or args.tasks, query=args.query, fmt=args.context_format,
                       encoding=_check_encoding(args.encoding))
    if args.allow_empty:
        tasks = [dataclasses.replace(task, allow_empty=True) for task in tasks]
    rlm = _build_rlm(args, RLM, budget_prefix="task_", verbose=False,
                     max_concurrency=max(64, args.concurrency * 4),
                     reuse_workers=not args.fresh_workers, **_cache_options(args))
    if not args.quiet:
        rlm.size_clients(args.concurrency)  # what run_job does too: say it up front
        given = _limits(args)
        print(f"rlm batch: {args.concurrency} tasks at a time; per model up to "
              f"{rlm.client.max_concurrency} root and {rlm.sub_client.max_concurrency} sub "
              "requests in flight, paced to "
              + ("the given limits and " if given else "")
              + "the provider's rate limits (learned from its headers and 429s)",
              file=sys.stderr)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        summary = rlm.run_job(
            tasks, args.out, concurrency=args.concurrency, max_cost_usd=args.max_cost_usd,
            max_tokens=args.max_tokens, max_time_s=args.max_time_s,
            retry_failed=args.retry_failed, sort_output=args.sorted, progress=not args.quiet,
            backend=args.backend, ray_address=args.ray_address, schema=schema,
            batch_api=batch_api,
        )
    except ConnectionError as exc:
        if args.backend != "ray":
            raise
        # Ray found no cluster at --ray-address (its own words name its flags, not ours).
        reason = str(exc).split(". ")[0].rstrip(".")
        where = f"--ray-address {args.ray_address}" if args.ray_address else "--backend ray"
        raise UsageError(f"{where}: {reason}; start one with `ray start --head`, or leave out "
                         "--ray-address to start a local one") from None
    except KeyboardInterrupt:
        print(f"rlm: interrupted; {args.out} holds every task that finished (re-run to resume)",
              file=sys.stderr)
        return 130
    except _Terminated:
        print(f"rlm: terminated; {args.out} holds every task that finished (re-run to resume)",
              file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)
        rlm.close()
    return summary.exit_code


def _check_ray_client(address: str) -> None:
    """A ray:// address needs Ray Client (grpcio), which a plain ``pip install ray`` lacks."""
    try:
        import grpc  # noqa: F401
    except ImportError:
        raise UsageError(
            f"--ray-address {address} needs Ray Client, which is not installed: pip install "
            "'rlm-sandbox[ray]' (or 'ray[client]')"
        ) from None


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from rlm import demo
    from rlm.core import RLM

    _check_log_dir(args.log_dir)
    # soft_wrap: piped output keeps each line whole (a path cut in two cannot be pasted).
    console = Console(soft_wrap=True)
    console.print(f"[bold]rlm demo[/]: building a {args.lines:,}-line haystack with one hidden needle...")
    haystack = demo.build_haystack(args.lines)
    console.print(
        f"context: {len(haystack.text):,} characters; the root model never sees it, only a "
        "description; the REPL holds it as `context`."
    )
    server = None
    if args.base_url:
        key = _require_key(args.api_key, args.model, getattr(args, "recursive_model", None))
        model = args.model or os.environ.get("RLM_MODEL")
        if not model:
            raise UsageError("--model is needed with --base-url (or set RLM_MODEL)")
        rlm = RLM(model=model, recursive_model=args.recursive_model, base_url=args.base_url,
                  api_key=key, log_dir=args.log_dir, verbose=not args.quiet, sandbox=args.sandbox)
        latency = 0.0
    else:
        server = demo.demo_server(latency=args.latency).start()
        console.print(
            f"offline: FakeLLMServer at {server.url} plays a scripted root model and a sub-model "
            f"that reads each chunk ({args.latency:g} s simulated latency per call)."
        )
        rlm = RLM(model=demo.ROOT_MODEL, recursive_model=demo.SUB_MODEL, base_url=server.url,
                  api_key="offline-demo", log_dir=args.log_dir, verbose=not args.quiet,
                  max_concurrency=256, sandbox=args.sandbox)
        latency = args.latency
    try:
        start = time.perf_counter()
        result = rlm.completion(context=haystack.text, query=demo.QUERY)
        wall = time.perf_counter() - start
    finally:
        rlm.close()
        if server is not None:
            server.stop()
    outcome = demo.summarize(result, haystack, wall, latency)
    verdict = "[green]correct[/]" if outcome.correct else f"[red]wrong[/] (expected {outcome.expected})"
    console.print()
    from rich.markup import escape

    from rlm.display.formatting import clean_text

    # The answer is the model's text: escaped for rich markup and made inert for the terminal.
    console.print(f"answer:       [bold]{escape(clean_text(outcome.answer))}[/]  {verdict}")
    console.print(f"needle:       line {haystack.needle_line:,} of {haystack.lines:,}")
    console.print(f"iterations:   {outcome.iterations}")
    console.print(f"sub-queries:  {outcome.sub_calls}")
    console.print(f"wall time:    {outcome.wall_s:.2f} s")
    if latency:
        console.print(f"sequential:   {outcome.sequential_s:.1f} s of sub-query latency if run one by one "
                      f"({demo.speedup_text(outcome)})")
    if result.error:
        console.print(f"[red]error:[/] {result.error}")
    if result.log_path:
        # Last, and as a command that works as printed from here.
        console.print(f"trajectory:   {result.log_path}")
        console.print(f"view it with: {self_command()} view {result.log_path}", highlight=False)
    return EXIT_OK if outcome.correct or (args.base_url and result.answer) else EXIT_FAILED


def cmd_bench_generate(args: argparse.Namespace) -> int:
    from rlm.bench.generators import generate

    out = _check_output_file("--out", args.out)
    count = 0
    with out.open("w", encoding="utf-8") as fh:
        for task in generate(args.task, args.length, args.n, args.seed):
            fh.write(json.dumps(task.to_json(), ensure_ascii=False) + "\n")
            count += 1
    print(f"wrote {count} {args.task} task(s) of {args.length} tokens to {args.out}",
          file=sys.stderr)
    return EXIT_OK


def _bench_prompt(choice: str, sub_window_chars: int) -> tuple[str | None, str]:
    """The root system prompt for ``--prompt`` (None: the built-in one) and its label."""
    from rlm import prompts

    if choice == "default":
        return None, "default"
    if choice == "paper":
        return prompts.paper_system_prompt(sub_window_chars), "paper"
    path = Path(choice)
    if not path.is_file():
        raise UsageError(f"--prompt {choice}: not 'paper', 'default' or a readable file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--prompt {choice}: cannot read it as UTF-8 text ({exc})") from None
    if not text.strip():
        raise UsageError(f"--prompt {choice}: the file is empty")
    return text, f"file {choice}"


def _split_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def cmd_bench_run(args: argparse.Namespace) -> int:
    import asyncio

    from rlm.bench.runner import BenchPlan, arun_bench
    from rlm.core import DEFAULT_SUB_WINDOW_CHARS, RLM
    from rlm.usage import PRICE_HELP

    plan = BenchPlan(tasks=_split_list(args.tasks), lengths=_split_list(args.lengths), n=args.n,
                     seed=args.seed, methods=_split_list(args.methods))
    plan.check()
    _check_log_dir(args.log_dir)
    system_prompt, prompt_label = _bench_prompt(args.prompt, DEFAULT_SUB_WINDOW_CHARS)
    rlm = _build_rlm(args, RLM, budget_prefix="task_", verbose=False,
                     max_concurrency=max(64, args.concurrency * 16), system_prompt=system_prompt,
                     **_cache_options(args))
    try:
        if args.max_cost_usd is not None:
            # An unpriced model would count as $0 and the cap would never bind.
            for client, model in ((rlm.client, rlm.model), (rlm.sub_client, rlm.recursive_model)):
                if client.price(model) is None:
                    raise UsageError(f"--max-cost-usd needs a price for {model!r}; "
                                     + PRICE_HELP.format(model=model))
        summary = asyncio.run(arun_bench(
            rlm, plan, args.out, concurrency=args.concurrency, max_cost_usd=args.max_cost_usd,
            max_time_s=args.max_time_s, window=args.window_tokens, rlms_python=args.rlms_python,
            api_key=_require_key(args.api_key, args.model, getattr(args, "recursive_model", None)), retry_failed=args.retry_failed,
            progress=not args.quiet, meta={"prompt": prompt_label},
        ))
    except KeyboardInterrupt:
        print(f"rlm: interrupted; {args.out}/results.jsonl holds every cell that finished "
              "(re-run to resume)", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        rlm.close()
    _print_bench_table(args.out)
    return summary.exit_code


def _print_bench_table(out: str) -> None:
    from rich.console import Console

    from rlm.bench.report import rich_table

    data = json.loads((Path(out) / "summary.json").read_text(encoding="utf-8"))
    # Piped or redirected output gets the width of the whole table, not 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(rich_table(data["rows"], title=f"rlm bench: {out}"))
    print(f"report: {Path(out) / 'report.html'}", file=sys.stderr)


def cmd_bench_score(args: argparse.Namespace) -> int:
    from rlm.bench.runner import rescore

    directory = Path(args.dir)
    if not directory.is_dir():
        raise UsageError(f"{args.dir}: not a directory; give the --out directory of a rlm bench run")
    rescore(directory)
    _print_bench_table(args.dir)
    return EXIT_OK


def _read_trajectory(log: str) -> list[dict[str, Any]]:
    from rlm.trajectory import is_trajectory, read_log

    path = Path(log)
    if not path.exists():
        raise UsageError(f"log file not found: {log}")
    if path.is_dir():
        raise UsageError(f"{log} is a directory; give one .jsonl log file from it")
    try:
        events = read_log(path)
    except UnicodeDecodeError:
        raise UsageError(f"{log} is not a text file; give a .jsonl log written by a run") from None
    except OSError as exc:
        raise UsageError(f"cannot read {log}: {exc.strerror or exc}") from None
    if not events:
        raise UsageError(f"{log} holds no trajectory events")
    if not is_trajectory(events):
        raise UsageError(
            f"{log} is not an rlm trajectory (no run events in it); give a log written by "
            "a run with --log-dir"
        )
    return events


def _write_otlp(args: argparse.Namespace, events: list[dict[str, Any]]) -> None:
    from rlm.trajectory_otlp import trajectory_otlp

    out = _check_output_file("--otlp", args.otlp)
    last = max((e["t"] for e in events if isinstance(e.get("t"), int | float)), default=0.0)
    # A log from before runs recorded their start: it ended when the file was last written.
    origin = Path(args.log).stat().st_mtime - last
    document = trajectory_otlp(events, origin=origin)
    try:
        out.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--otlp {args.otlp}: cannot write it ({exc.strerror or exc})") from None
    spans = sum(len(scope["spans"]) for rs in document["resourceSpans"] for scope in rs["scopeSpans"])
    print(f"wrote {args.otlp} ({spans:,} spans, OTLP JSON)")


def cmd_view(args: argparse.Namespace) -> int:
    out = _check_output_file("--html", args.html) if args.html else None
    events = _read_trajectory(args.log)
    if args.otlp:
        _write_otlp(args, events)
        if out is None:
            return EXIT_OK
    if out is not None:
        from rlm.display import trajectory_html

        try:
            out.write_text(trajectory_html(events), encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"--html {args.html}: cannot write it ({exc.strerror or exc})") from None
        print(f"wrote {args.html}")
    else:
        from rlm.display import render_log

        render_log(events, show_sub_queries=True)
    return EXIT_OK


def cmd_repl(args: argparse.Namespace) -> int:
    encoding = _check_encoding(args.encoding)
    key = _require_key(args.api_key, args.model, getattr(args, "recursive_model", None))
    context = _read_context(args.context, args.context_format, encoding, args.allow_empty)
    from rlm.ipython import start_repl
    from rlm.llm import AsyncOpenAIClient

    client = AsyncOpenAIClient(model=args.model, api_key=key, base_url=args.base_url,
                               max_concurrency=args.max_concurrency, **_cache_options(args))
    try:
        start_repl(context, client)
    finally:
        client.close_sync()
    return EXIT_OK


# -- argument parsing ------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the message names the flag and where to look."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _bounded(parse: Callable[[str], Any], kind: str, ok: Callable[[Any], bool],
             bound: str) -> Callable[[str], Any]:
    """An argparse ``type=``: ``parse`` the text (else "expected {kind}"), then check it
    with ``ok`` (else "must be {bound}"); both messages quote what was typed."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text.strip()}")
        return value

    return convert


_positive_int = _bounded(int, "a whole number", lambda v: v >= 1, "at least 1")
# NaN fails both comparisons; infinity is no usable limit or latency.
_positive_float = _bounded(float, "a number", lambda v: v > 0 and v != math.inf, "a number > 0")
_non_negative_float = _bounded(float, "a number", lambda v: v >= 0 and v != math.inf,
                               "a number >= 0")
_port = _bounded(int, "a whole number", lambda v: 0 <= v <= 65535, "a port from 0 to 65535")


def _base_url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(
            f"expected an http:// or https:// URL such as http://localhost:8000/v1, got {text!r}"
        )
    return text


_SANDBOX_HELP = ("where REPL code runs: 'process' (a worker process with time, memory, network "
                 "and file limits) or 'local' (in-process, faster, policy checks only) "
                 "(default: process on Linux and macOS, local elsewhere)")
_FORMATS = ["auto", "text", "json", "jsonl"]


def _add_context_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--context", required=True, help="context file, or - for standard input")
    p.add_argument("--context-format", dest="context_format", choices=_FORMATS, default="auto",
                   help="how to load the context: text, json (one value) or jsonl (a list, one "
                        "value a line) (default: auto, by file extension)")
    # The old spelling, kept working but hidden: --format read like an output format next to --json.
    p.add_argument("--format", dest="context_format", choices=_FORMATS, help=argparse.SUPPRESS)
    p.add_argument("--encoding", default="utf-8", help="text encoding of the context file (default: utf-8)")
    p.add_argument("--allow-empty", action="store_true",
                   help="run even when the context file is empty (refused by default)")


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    # Shared by run, batch, serve and mcp, so all take the same model and endpoint options.
    parser.add_argument("--model", help="root model; a prefix anthropic/, azure/, gemini/ or "
                                        "openai/ picks that provider's native protocol, endpoint "
                                        "and key (default: $RLM_MODEL, else gpt-4o-mini)")
    parser.add_argument("--recursive-model", help="model for llm_query sub-calls, on any "
                                                  "provider (default: --model)")
    parser.add_argument("--base-url", type=_base_url,
                        help="the root model's endpoint; for a bare model name an "
                             "OpenAI-compatible base URL: vLLM, Ollama, llama.cpp, OpenRouter "
                             "(default: the provider's variable, $OPENAI_BASE_URL for a bare "
                             "name, else the provider's own endpoint)")
    parser.add_argument("--api-key", help="the root model's API key (default: its provider's "
                                          "variable: $OPENAI_API_KEY, $ANTHROPIC_API_KEY, "
                                          "$AZURE_OPENAI_API_KEY, $GEMINI_API_KEY)")
    parser.add_argument("--endpoint", action="append", metavar="PROVIDER=URL",
                        help="endpoint of a sub model on another provider than the root, "
                             "repeatable, e.g. openai=http://localhost:8000/v1; its key comes "
                             "from the provider's variable (default: the provider's own "
                             "endpoint)")
    parser.add_argument("--max-iterations", type=_positive_int, default=20,
                        help="root turns before a run must answer; for rlm run hitting it exits 3 "
                             "(default: 20)")
    parser.add_argument("--max-depth", type=_positive_int, default=1,
                        help="1: llm_query calls a model; 2: it runs a child RLM with its own REPL "
                             "(default: 1)")
    parser.add_argument("--sandbox", choices=["local", "process"], default=None, help=_SANDBOX_HELP)


def _add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """Rate limits to pace to, for run, batch, serve and mcp."""
    parser.add_argument("--rpm", type=_positive_float, default=None,
                        help="requests per minute to send to each model at most (default: "
                             "learned from the provider's rate-limit headers and 429s)")
    parser.add_argument("--tpm", type=_positive_float, default=None,
                        help="tokens per minute to send to each model at most, by the estimate "
                             "prompt chars / 4 + max_tokens (default: learned, as --rpm)")
    parser.add_argument("--limit", action="append", metavar="MODEL=rpm:N,tpm:N",
                        help="one model's requests and tokens per minute, repeatable; either "
                             "part may be left out (default: --rpm and --tpm)")


def _add_budget_flags(parser: argparse.ArgumentParser, prefix: str, scope: str, *,
                      tokens: bool = True) -> None:
    parser.add_argument(f"--{prefix}max-cost-usd", type=_positive_float, default=None,
                        help=f"stop {scope} after spending this many US dollars (default: no limit)")
    if tokens:
        parser.add_argument(f"--{prefix}max-tokens", type=_positive_int, default=None,
                            help=f"stop {scope} after this many root and sub tokens (default: no limit)")
    parser.add_argument(f"--{prefix}max-time-s", type=_positive_float, default=None,
                        help=f"stop {scope} after this many seconds of wall time (default: no limit)")


def _add_format_flags(parser: argparse.ArgumentParser) -> None:
    """How to read context files, for batch (run and repl take ``_add_context_args``)."""
    parser.add_argument("--context-format", dest="context_format", choices=_FORMATS, default="auto",
                        help="how to load a context file: text, json or jsonl (default: auto, by "
                             "file extension)")
    parser.add_argument("--format", dest="context_format", choices=_FORMATS, help=argparse.SUPPRESS)
    parser.add_argument("--encoding", default="utf-8", help="text encoding of context files (default: utf-8)")


def _add_upstream_args(p: argparse.ArgumentParser) -> None:
    """The upstream model, endpoint and budget flags shared by run, serve and mcp."""
    _add_model_flags(p)
    _add_budget_flags(p, "", "a run", tokens=False)
    p.add_argument("--log-dir", default=None,
                   help="write each trajectory as JSONL here, for rlm view (default: no log)")


def _add_cost_flags(p: argparse.ArgumentParser) -> None:
    """Prices and the token budget, shared by run, serve and mcp."""
    p.add_argument("--prices", action="append", metavar="FILE.json",
                   help='model prices as {"model": [usd_per_1M_in, usd_per_1M_out]}, '
                        "repeatable (default: the built-in table and the file named by "
                        "$RLM_PRICES)")
    p.add_argument("--price", action="append", metavar="MODEL=IN,OUT",
                   help="one model's price in USD per 1M input and output tokens, repeatable "
                        "(default: none)")
    p.add_argument("--max-tokens", type=_positive_int, default=None,
                   help="stop when root and sub-calls together used this many tokens "
                        "(default: no limit)")


def _add_server_args(p: argparse.ArgumentParser) -> None:
    """Flags both servers take beyond the upstream ones."""
    p.add_argument("--allow-dir", action="append", default=[], metavar="DIR",
                   help="clients may read context files under DIR, repeatable (default: none)")
    p.add_argument("--max-context-mb", type=_positive_float, default=256.0,
                   help="largest context file a client may read, in MB (default: 256)")
    p.add_argument("--max-concurrency", type=_positive_int, default=64,
                   help="sub-queries in flight at once, across all requests (default: 64)")
    _add_limit_flags(p)


def _upstream_settings(args: argparse.Namespace) -> Any:
    from rlm.serve.runs import UpstreamSettings

    return UpstreamSettings(
        model=args.model,
        recursive_model=args.recursive_model,
        base_url=args.base_url,
        api_key=_require_key(args.api_key, args.model, getattr(args, "recursive_model", None)),
        endpoints=_endpoints(args),
        max_iterations=args.max_iterations,
        max_depth=args.max_depth,
        max_cost_usd=args.max_cost_usd,
        max_tokens=args.max_tokens,
        max_time_s=args.max_time_s,
        prices=_prices(args),
        sandbox=args.sandbox,
        log_dir=args.log_dir,
        max_concurrency=args.max_concurrency,
        limits=_limits(args),
        **_cache_options(args),
    )


def _allowed_dirs(args: argparse.Namespace) -> Any:
    from rlm.serve.paths import AllowedDirs

    return AllowedDirs(args.allow_dir, max_bytes=int(args.max_context_mb * 1024 * 1024))


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from rlm.serve.auth import auth_key_from, check_bind
    from rlm.serve.openai_server import ServeOptions, print_ready, serve
    from rlm.serve.runs import QueryRunner

    auth_key = auth_key_from(args.auth_key)
    check_bind(args.host, auth_key)
    if args.max_running < 1 or args.max_queue < 0:
        raise UsageError("--max-running must be >= 1 and --max-queue >= 0")
    options = ServeOptions(
        host=args.host,
        port=args.port,
        auth_key=auth_key,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_running=args.max_running,
        max_queue=args.max_queue,
        allow_dirs=_allowed_dirs(args),
        allowed_hosts=tuple(args.allowed_host),
    )
    runner = QueryRunner(_upstream_settings(args))
    try:
        with _priced_for_budget(args, "--max-cost-usd"):
            runner.new_rlm()  # the settings every request's RLM gets, checked before listening
    except BaseException:
        asyncio.run(runner.aclose())
        raise
    asyncio.run(serve(runner, options, on_ready=lambda url: print_ready(url, runner)))
    return EXIT_OK


def cmd_mcp(args: argparse.Namespace) -> int:
    from rlm.serve.auth import auth_key_from

    try:
        from rlm.serve.mcp_server import McpOptions, run_mcp
    except ImportError as exc:
        raise UsageError(
            f"rlm mcp needs the MCP SDK ({exc}): pip install 'rlm-sandbox[mcp]'"
        ) from None
    host, port = None, None
    if args.http:
        host, _, port_text = args.http.rpartition(":")
        if not host or not port_text.isdigit():
            raise UsageError(f"--http wants HOST:PORT (e.g. 127.0.0.1:8765), got {args.http!r}")
        host, port = host.strip("[]"), int(port_text)
        if port > 65535:
            raise UsageError(f"--http {args.http}: the port must be from 0 to 65535 (0 picks a free one)")
    options = McpOptions(
        http_host=host,
        http_port=port,
        auth_key=auth_key_from(args.auth_key) if args.http else None,
        allow_dirs=_allowed_dirs(args),
        max_sessions=args.max_sessions,
        session_idle_s=args.session_idle_s,
        max_output_chars=args.max_output_chars,
        cell_timeout_s=args.cell_timeout_s,
    )
    with _priced_for_budget(args, "--max-cost-usd"):
        run_mcp(_upstream_settings(args), options)
    return EXIT_OK


def _add_cache_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cache", nargs="?", const=True, default=None, metavar="DIR",
                       help="reuse replies from the sub-query cache in DIR (default: "
                            "RLM_CACHE_DIR or the per-user cache directory) and store new ones")
    group.add_argument("--no-cache", action="store_true",
                       help="send every request, even identical ones in flight together")


def _cache_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.no_cache:
        return {"cache": None, "cache_read": False}
    if args.cache is not None:
        from rlm.cache import default_cache_dir

        where = args.cache if isinstance(args.cache, str) else str(default_cache_dir())
        _check_writable_dir("--cache", where)
    return {"cache": args.cache}


def cmd_cache(args: argparse.Namespace) -> int:
    from rlm.cache import cache_info, clear_cache

    if args.dir is not None and not Path(args.dir).expanduser().is_dir():
        # The library reports a directory without a cache as empty; a named one that is
        # missing (or a file) is a typo here.
        raise UsageError(f"{args.dir} is a file, not a cache directory" if Path(args.dir).exists()
                         else f"cache directory not found: {args.dir}")
    if args.action == "info":
        info = cache_info(args.dir)
        print(json.dumps(info.to_dict(), indent=2) if args.json else info.summary())
    else:
        removed = clear_cache(args.dir)
        print(f"cleared {removed.path}: {removed.entries:,} entries removed")
    return EXIT_OK


def _add_bench_parser(sub: Any) -> None:
    from rlm.bench.generators import FAMILIES

    bench = sub.add_parser(
        "bench", help="measure answer quality and cost: RLM vs a direct call, on generated tasks",
        description="Generate long-context tasks offline (RULER- and OOLONG-style), run them "
                    "with this project's RLM, one direct call and the official rlms package, "
                    "and compare scores and costs.",
    )
    bsub = bench.add_subparsers(dest="bench_command", required=True, parser_class=_Parser,
                                help="generate tasks, run the cells, or score a run again")
    families = ", ".join(FAMILIES)

    gen = bsub.add_parser("generate", help="write generated tasks as JSONL (rlm batch reads it)",
                          description="Write N tasks of one family and length to a JSONL file "
                                      "with id, query, context, expected, task and length.")
    gen.add_argument("--task", required=True, choices=FAMILIES, metavar="TASK",
                     help=f"task family: {families}")
    gen.add_argument("--length", required=True, type=_bench_length,
                     help="context length in tokens: 8k, 32k, 128k, 1m (k = 1024)")
    gen.add_argument("--n", type=_positive_int, default=5, help="tasks to write (default: 5)")
    gen.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    gen.add_argument("--out", required=True, help="tasks JSONL to write")
    gen.set_defaults(func=cmd_bench_generate)

    run = bsub.add_parser(
        "run", help="run every (task, length, method, seed) cell; resumable",
        description="Run each task family at each length with each method and write "
                    "tasks.jsonl, results.jsonl, summary.json and report.html to --out. "
                    "Re-running the same command skips cells already done. Exit codes: 0 "
                    "every cell has a result, 1 some failed or were not run (cost cap), 2 "
                    "usage error, 130 interrupted.",
    )
    run.add_argument("--tasks", default="niah,oolong",
                     help=f"comma-separated task families (default: niah,oolong); of {families}")
    run.add_argument("--lengths", default="8k,32k",
                     help="comma-separated context lengths in tokens (default: 8k,32k)")
    run.add_argument("--n", type=_positive_int, default=5, help="tasks per family and length (default: 5)")
    run.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    run.add_argument("--methods", default="rlm,direct",
                     help="comma-separated methods (default: rlm,direct); of rlm, direct, rlms")
    run.add_argument("--out", required=True, help="output directory (created; resumed)")
    _add_model_flags(run)
    _add_budget_flags(run, "", "the whole benchmark", tokens=False)
    _add_budget_flags(run, "task-", "each RLM run", tokens=False)
    run.add_argument("--concurrency", type=_positive_int, default=4,
                     help="cells run at once (default: 4)")
    run.add_argument("--prompt", default="default",
                     help="root system prompt: default (this project's), paper (written after "
                          "the RLM paper's), or a text file (default: default)")
    run.add_argument("--window-tokens", type=_positive_int, default=None,
                     help="the direct method's context window; longer prompts are recorded as "
                          "over window (default: the model's known window, else 128000)")
    run.add_argument("--rlms-python", default=None,
                     help="python of a virtualenv with the official rlms package, for the rlms "
                          "method (default: $RLM_BENCH_RLMS_PYTHON)")
    run.add_argument("--retry-failed", action="store_true", help="run cells whose line has an error again")
    run.add_argument("--log-dir", default=None, help="write each RLM trajectory as JSONL here (default: no logs)")
    run.add_argument("--prices", action="append", metavar="FILE.json",
                     help="model prices file, repeatable (default: the built-in table)")
    run.add_argument("--price", action="append", metavar="MODEL=IN,OUT",
                     help="one model's price in USD per 1M input and output tokens, repeatable "
                          "(default: none)")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary line")
    _add_cache_options(run)
    run.set_defaults(func=cmd_bench_run)

    score = bsub.add_parser("score", help="grade a run's results.jsonl again and rewrite the reports",
                            description="Re-score every line of DIR/results.jsonl with the current "
                                        "scorers, then rewrite summary.json and report.html.")
    score.add_argument("dir", help="the --out directory of a rlm bench run")
    score.set_defaults(func=cmd_bench_score)


def _bench_length(text: str) -> str:
    from rlm.bench.generators import parse_length
    from rlm.errors import ConfigError

    try:
        parse_length(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    """The ``rlm`` argument parser (one sub-parser per command)."""
    parser = _Parser(
        prog="rlm",
        description="Recursive Language Models: answer a query over a huge context through a sandboxed REPL.",
        epilog="exit codes: 0 answer, 1 failed run, 2 bad usage, 3 iteration limit hit "
               "(last-turn answer), 130 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"rlm {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser(
        "run", help="answer a query over a context file",
        description="Answer a query over a context file. The answer (or --json) goes to stdout; "
                    "the live view (-v) and the progress line go to stderr.",
        epilog="exit codes: 0 answer, 1 failed run (no answer), 2 bad usage, 3 stopped at "
               "--max-iterations (stdout has the last-turn answer), 130 interrupted, "
               "143 terminated",
    )
    _add_context_args(run)
    run.add_argument("--query", required=True, help="the question to answer")
    _add_upstream_args(run)
    _add_cost_flags(run)
    _add_limit_flags(run)
    run.add_argument("--max-concurrency", type=_positive_int, default=64,
                     help="sub-queries in flight at once (default: 64)")
    run.add_argument("--json", action="store_true",
                     help="print the result (answer, stop reason, usage) as JSON on stdout")
    run.add_argument("--verbose", "-v", action="store_true", help="show each iteration live on stderr")
    run.add_argument("--trace", action="store_true",
                     help="send the run's OpenTelemetry spans: over OTLP/HTTP when "
                          "OTEL_EXPORTER_OTLP_ENDPOINT is set, else printed to stderr; needs "
                          "opentelemetry-sdk (default: traced when $RLM_TRACING is 1)")
    run.add_argument("--schema", metavar="FILE.json",
                     help="a JSON Schema the answer must match; prints the validated JSON "
                          "(default: a free-text answer)")
    _add_cache_options(run)
    run.set_defaults(func=cmd_run)

    batch = sub.add_parser(
        "batch",
        help="run one query (or one per task) over many documents; resumable",
        description="Run many tasks and append one JSON line per finished task to --out. "
        "Re-running the same command skips ids already in --out. Exit codes: 0 all "
        "succeeded, 1 some failed or were not run, 2 usage error, 130/143 interrupted "
        "(the output stays valid).",
    )
    batch.add_argument("tasks", nargs="?", help='JSONL ({"id", "query", "context" | '
                       '"context_path"} per line) or CSV with those columns')
    batch.add_argument("--dir", help="one task per file under this directory, id = relative path (default: a tasks file)")
    batch.add_argument("--query", help="the query for every task, required with --dir (default: each task's own)")
    batch.add_argument("--out", required=True, help="results JSONL (appended; resumed)")
    _add_model_flags(batch)
    _add_limit_flags(batch)
    _add_budget_flags(batch, "", "the whole job")
    _add_budget_flags(batch, "task-", "each task")
    batch.add_argument("--concurrency", type=_positive_int, default=8, help="tasks run at once (default: 8)")
    batch.add_argument("--retry-failed", action="store_true", help="re-run tasks whose line has an error")
    batch.add_argument("--sorted", action="store_true", help="rewrite --out in input order at the end")
    batch.add_argument("--log-dir", default=None, help="write each task's trajectory as JSONL here (default: no logs)")
    _add_format_flags(batch)
    batch.add_argument("--backend", choices=["local", "ray"], default="local",
                       help="where tasks run: this process or a Ray cluster (default: local)")
    batch.add_argument("--ray-address", default=None,
                       help="Ray cluster to join, 'auto' for the running one (default: start a local one)")
    batch.add_argument("--schema", metavar="FILE.json",
                       help="a JSON Schema each answer must match; each line gets 'output', "
                            "the validated JSON (default: free-text answers)")
    batch.add_argument("--allow-empty", action="store_true",
                       help="run tasks whose context file is empty (by default they fail, as "
                            "rlm run refuses an empty --context)")
    batch.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    batch.add_argument("--batch-api", action="store_true",
                       help="send every model call through the provider's Batch API: half the "
                            "price, results in minutes to 24 h; the job's state is kept next "
                            "to --out, so re-running the command after a crash resumes it")
    batch.add_argument("--batch-window-s", type=_non_negative_float, default=10.0,
                       help="with --batch-api: submit a batch file at most this long after its "
                            "first call (default: 10; it goes at once when every task waits)")
    batch.add_argument("--batch-fallback-after-s", type=_non_negative_float, default=None,
                       help="with --batch-api: send what a batch has not answered after this "
                            "long (or after its retries) to the live API at list price "
                            "(default: wait for the provider)")
    batch.add_argument("--batch-max-tries", type=_positive_int, default=3,
                       help="with --batch-api: submissions of one call before it fails or "
                            "goes live (default: 3)")
    batch.add_argument("--batch-poll-s", type=_positive_float, default=1.0,
                       help="with --batch-api: the shortest wait between two looks at a "
                            "batch (default: 1; later looks come about every tenth of its age, "
                            "at most every 60 s)")
    batch.add_argument("--fresh-workers", action="store_true",
                       help="a new sandbox worker process for every task (default: a finished "
                            "task's worker is reset and reused; see the README's security model)")
    _add_cache_options(batch)
    batch.set_defaults(func=cmd_batch)

    demo = sub.add_parser(
        "demo", help="offline demo: a needle in a 1,000,000-line haystack",
        description="Find one hidden line in a generated haystack, offline: the bundled fake "
                    "server plays the root model and a sub-model that reads each chunk, with "
                    "simulated latency, so the concurrent fan-out shows. --base-url runs the "
                    "same task against a real model instead.",
    )
    demo.add_argument("--base-url", type=_base_url, help="run against a real OpenAI-compatible server instead (default: offline, "
                           "against the bundled fake server)")
    demo.add_argument("--model", help="root model for --base-url (default: $RLM_MODEL)")
    demo.add_argument("--recursive-model", help="sub model for --base-url (default: --model)")
    demo.add_argument("--api-key", help="API key for --base-url (default: $OPENAI_API_KEY)")
    demo.add_argument("--lines", type=_positive_int, default=1_000_000,
                      help="haystack size in lines (default: 1000000)")
    demo.add_argument("--latency", type=_non_negative_float, default=0.5,
                      help="simulated latency per call in seconds, offline (default: 0.5)")
    demo.add_argument("--sandbox", choices=["local", "process"], default=None, help=_SANDBOX_HELP)
    demo.add_argument("--log-dir", default="rlm_logs", help="where the trajectory goes (default: rlm_logs)")
    demo.add_argument("--quiet", "-q", action="store_true", help="no live trajectory")
    demo.set_defaults(func=cmd_demo)

    srv = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server whose model is an RLM",
        description="Serve POST /v1/chat/completions and GET /v1/models: the last user message "
                    "is the query, the earlier messages are the context, and each request runs "
                    "one RLM (streaming, structured output and forced tool calls included). "
                    "The model flags name the upstream; the budget flags cap every run.",
    )
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on; beyond loopback needs --auth-key (default: 127.0.0.1)")
    srv.add_argument("--port", type=_port, default=8000, help="port to listen on, 0 for any free port (default: 8000)")
    srv.add_argument("--auth-key", default=None,
                     help="bearer key clients must send (default: RLM_SERVE_AUTH_KEY; none on loopback)")
    srv.add_argument("--max-body-mb", type=_positive_float, default=64.0, help="largest request body, in MB; 413 beyond (default: 64)")
    srv.add_argument("--max-running", type=_positive_int, default=8, help="RLM runs at once (default: 8)")
    srv.add_argument("--max-queue", type=int, default=32, help="requests waiting for a run slot; 429 beyond (default: 32)")
    srv.add_argument("--allowed-host", action="append", default=[], metavar="HOST[:PORT]",
                     help="also answer requests whose Host (or browser Origin) is HOST, repeatable; "
                          "'*' for any (default: loopback names and the --host address; 421 otherwise)")
    _add_upstream_args(srv)
    _add_cost_flags(srv)
    _add_cache_options(srv)
    _add_server_args(srv)
    srv.set_defaults(func=cmd_serve)

    mcp = sub.add_parser(
        "mcp", help="an MCP server: rlm_query and a sandboxed REPL for agents",
        description="Serve the MCP tools rlm_query (a whole RLM run, with progress "
                    "notifications) and repl_open/repl_exec/repl_close (the sandboxed REPL, "
                    "with the agent as the root model), over stdio or, with --http, streamable "
                    "HTTP at /mcp with a bearer key.",
    )
    mcp.add_argument("--http", metavar="HOST:PORT", default=None,
                     help="serve streamable HTTP at http://HOST:PORT/mcp (default: stdio)")
    mcp.add_argument("--auth-key", default=None,
                     help="with --http: bearer key clients must send (default: RLM_SERVE_AUTH_KEY)")
    mcp.add_argument("--max-sessions", type=_positive_int, default=8, help="REPL sessions open at once (default: 8)")
    mcp.add_argument("--session-idle-s", type=_positive_float, default=900.0,
                     help="close a REPL session idle this many seconds (default: 900)")
    mcp.add_argument("--max-output-chars", type=_positive_int, default=20_000,
                     help="cut what one repl_exec returns to this many characters (default: 20000)")
    mcp.add_argument("--cell-timeout-s", type=_positive_float, default=120.0, help="wall-clock limit of one repl_exec, in seconds (default: 120)")
    _add_upstream_args(mcp)
    _add_cost_flags(mcp)
    _add_cache_options(mcp)
    _add_server_args(mcp)
    mcp.set_defaults(func=cmd_mcp)

    view = sub.add_parser(
        "view", help="render a JSONL trajectory log",
        description="Show a run's trajectory (written with --log-dir) in the terminal: each "
                    "iteration's code, output, sub-queries and the answer; or write it as one "
                    "self-contained HTML page with --html, or its spans as OTLP JSON with --otlp.",
    )
    view.add_argument("log", help="a .jsonl log written by a run with --log-dir")
    view.add_argument("--html", metavar="OUT", help="write one self-contained HTML page there instead (default: render in the "
                           "terminal)")
    view.add_argument("--otlp", metavar="OUT.json",
                      help="also write the run's spans there as OTLP JSON, for any OpenTelemetry backend; "
                           "prompts and replies only with OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true "
                           "(default: none)")
    view.set_defaults(func=cmd_view)

    rp = sub.add_parser(
        "repl", help="explore a context by hand in IPython with llm_query & co.",
        description="Open IPython with the context file loaded as `context` and llm_query, "
                    "llm_query_batch and their async forms bound to the model: be the root "
                    "model yourself.",
    )
    _add_context_args(rp)
    rp.add_argument("--model", help="sub-model for llm_query (default: $RLM_MODEL, else gpt-4o-mini)")
    rp.add_argument("--base-url", type=_base_url, help="OpenAI-compatible base URL (default: $OPENAI_BASE_URL)")
    rp.add_argument("--api-key", help="API key (default: $OPENAI_API_KEY)")
    rp.add_argument("--max-concurrency", type=_positive_int, default=64,
                    help="sub-queries in flight at once (default: 64)")
    _add_cache_options(rp)
    rp.set_defaults(func=cmd_repl)

    cache = sub.add_parser(
        "cache", help="inspect or empty the sub-query cache",
        description="info: how many replies the cache directory holds, their size and hits; "
                    "clear: remove every entry.",
    )
    cache.add_argument("action", choices=["info", "clear"],
                       help="info: entries, size and hits; clear: remove every entry")
    cache.add_argument("dir", nargs="?", default=None,
                       help="cache directory (default: RLM_CACHE_DIR or the per-user cache dir)")
    cache.add_argument("--json", action="store_true", help="info as JSON")
    cache.set_defaults(func=cmd_cache)
    _add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rlm`` console script."""
    from rlm.errors import AccessDeniedError, ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (UsageError, ConfigError, AccessDeniedError) as exc:
        print(f"rlm: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("rlm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `rlm view LOG | head`: the reader left; say nothing more and exit quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
