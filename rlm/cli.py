"""The ``rlm`` command: run, demo, view, repl, cache, serve and mcp.

Exit codes: 0 when a run produced an answer, 1 when it failed, 2 for bad usage (a
missing file, an undecodable file, a missing key, a bad option).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input on the command line: printed, exit code 2."""


def _read_context(source: str, fmt: str, encoding: str) -> Any:
    if source == "-":
        raw = sys.stdin.buffer.read()
        name = "standard input"
    else:
        path = Path(source)
        if not path.exists():
            raise UsageError(f"context file not found: {source}")
        if path.is_dir():
            raise UsageError(f"context must be a file, not a directory: {source}")
        raw = path.read_bytes()
        name = source
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{name} is not valid {encoding} text (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}); convert it to text first or pass --encoding (e.g. latin-1)"
        ) from exc
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


def _require_key(api_key: str | None) -> str:
    key = api_key or os.environ.get("OPENAI_API_KEY")
    if not key:
        raise UsageError(
            "no API key: set OPENAI_API_KEY or pass --api-key (for a local server that needs "
            "none, pass any value, e.g. --api-key local)"
        )
    return key


def _print_result(result: Any, as_json: bool) -> int:
    if as_json:
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    elif result.answer is not None:
        print(result.answer)
    # A run sets `error` only when it ends without an answer (see RLM._run).
    if result.answer is None:
        if not as_json:
            print(f"rlm: run failed ({result.stopped_reason}): {result.error}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from rlm.core import RLM

    context = _read_context(args.context, args.format, args.encoding)
    key = _require_key(args.api_key)
    rlm = RLM(
        model=args.model,
        recursive_model=args.recursive_model,
        base_url=args.base_url,
        api_key=key,
        max_iterations=args.max_iterations,
        max_depth=args.max_depth,
        sandbox=args.sandbox,
        log_dir=args.log_dir,
        verbose=args.verbose,
        max_cost_usd=args.max_cost_usd,
        max_time_s=args.max_time_s,
        **_cache_options(args),
    )
    try:
        result = rlm.completion(context=context, query=args.query)
    finally:
        rlm.close()
    return _print_result(result, args.json)


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from rlm import demo
    from rlm.core import RLM

    console = Console(stderr=False)
    console.print(f"[bold]rlm demo[/]: building a {args.lines:,}-line haystack with one hidden needle...")
    haystack = demo.build_haystack(args.lines)
    console.print(
        f"context: {len(haystack.text):,} characters; the root model never sees it, only a "
        "description; the REPL holds it as `context`."
    )
    server = None
    if args.base_url:
        key = _require_key(args.api_key)
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
    console.print(f"answer:       [bold]{outcome.answer}[/]  {verdict}")
    console.print(f"needle:       line {haystack.needle_line:,} of {haystack.lines:,}")
    console.print(f"iterations:   {outcome.iterations}")
    console.print(f"sub-queries:  {outcome.sub_calls}")
    console.print(f"wall time:    {outcome.wall_s:.2f} s")
    if latency:
        console.print(
            f"sequential:   {outcome.sequential_s:.1f} s of sub-query latency if run one by one "
            f"({outcome.sequential_s / max(outcome.wall_s, 1e-9):.0f}x longer)"
        )
    if result.log_path:
        console.print(f"trajectory:   {result.log_path}  (view it with: rlm view {result.log_path})")
    if result.error:
        console.print(f"[red]error:[/] {result.error}")
    return EXIT_OK if outcome.correct or (args.base_url and result.answer) else EXIT_FAILED


def cmd_view(args: argparse.Namespace) -> int:
    from rlm.trajectory import read_log

    path = Path(args.log)
    if not path.exists():
        raise UsageError(f"log file not found: {args.log}")
    events = read_log(path)
    if not events:
        raise UsageError(f"{args.log} holds no trajectory events")
    from rlm import display

    if args.html:
        Path(args.html).write_text(display.trajectory_html(events, title=path.name), encoding="utf-8")
        print(f"wrote {args.html}")
    else:
        display.render_log(events)
    return EXIT_OK


def cmd_repl(args: argparse.Namespace) -> int:
    from rlm.ipython import start_repl
    from rlm.llm import AsyncOpenAIClient

    context = _read_context(args.context, args.format, args.encoding)
    key = _require_key(args.api_key)
    client = AsyncOpenAIClient(model=args.model, api_key=key, base_url=args.base_url,
                               max_concurrency=args.max_concurrency, **_cache_options(args))
    try:
        start_repl(context, client)
    finally:
        client.close_sync()
    return EXIT_OK


def _add_upstream_args(p: argparse.ArgumentParser) -> None:
    """The upstream model, endpoint and budget flags shared by run, serve and mcp."""
    p.add_argument("--model", help="root model (default: RLM_MODEL or gpt-4o-mini)")
    p.add_argument("--recursive-model", help="model for llm_query sub-calls (default: --model)")
    p.add_argument("--base-url", help="OpenAI-compatible base URL (vLLM, Ollama, llama.cpp, OpenRouter)")
    p.add_argument("--api-key", help="API key (default: OPENAI_API_KEY)")
    p.add_argument("--max-iterations", type=int, default=20)
    p.add_argument("--max-depth", type=int, default=1)
    p.add_argument("--max-cost-usd", type=float, default=None)
    p.add_argument("--max-time-s", type=float, default=None)
    p.add_argument("--sandbox", choices=["local", "process"], default=None)
    p.add_argument("--log-dir", default=None, help="write the trajectory as JSONL here")


def _add_server_args(p: argparse.ArgumentParser) -> None:
    """Flags both servers take beyond the upstream ones."""
    p.add_argument("--allow-dir", action="append", default=[], metavar="DIR",
                   help="clients may read context files under DIR (repeatable; default: none)")
    p.add_argument("--max-context-mb", type=float, default=256.0,
                   help="largest context file a client may read, in MB")
    p.add_argument("--max-concurrency", type=int, default=64,
                   help="sub-queries in flight at once, across all requests")


def _upstream_settings(args: argparse.Namespace) -> Any:
    from rlm.serve.runs import UpstreamSettings

    return UpstreamSettings(
        model=args.model,
        recursive_model=args.recursive_model,
        base_url=args.base_url,
        api_key=_require_key(args.api_key),
        max_iterations=args.max_iterations,
        max_depth=args.max_depth,
        max_cost_usd=args.max_cost_usd,
        max_time_s=args.max_time_s,
        sandbox=args.sandbox,
        log_dir=args.log_dir,
        max_concurrency=args.max_concurrency,
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
    )
    runner = QueryRunner(_upstream_settings(args))
    asyncio.run(serve(runner, options, on_ready=lambda url: print_ready(url, runner)))
    return EXIT_OK


def cmd_mcp(args: argparse.Namespace) -> int:
    from rlm.serve.auth import auth_key_from

    try:
        from rlm.serve.mcp_server import McpOptions, run_mcp
    except ImportError as exc:
        raise UsageError(
            f"rlm mcp needs the MCP SDK ({exc}): pip install 'rlm-repl[mcp]'"
        ) from None
    host, port = None, None
    if args.http:
        host, _, port_text = args.http.rpartition(":")
        if not host or not port_text.isdigit():
            raise UsageError(f"--http wants HOST:PORT (e.g. 127.0.0.1:8765), got {args.http!r}")
        host, port = host.strip("[]"), int(port_text)
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
    return {"cache": args.cache}


def cmd_cache(args: argparse.Namespace) -> int:
    from rlm.cache import cache_info, clear_cache

    if args.action == "info":
        info = cache_info(args.dir)
        print(json.dumps(info.to_dict(), indent=2) if args.json else info.summary())
    else:
        removed = clear_cache(args.dir)
        print(f"cleared {removed.path}: {removed.entries:,} entries removed")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlm",
        description="Recursive Language Models: answer a query over a huge context through a sandboxed REPL.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="answer a query over a context file")
    run.add_argument("--context", required=True, help="context file, or - for standard input")
    run.add_argument("--query", required=True, help="the question to answer")
    _add_upstream_args(run)
    run.add_argument("--format", choices=["auto", "text", "json", "jsonl"], default="auto",
                     help="how to load the context (auto: by file extension)")
    run.add_argument("--encoding", default="utf-8")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.add_argument("--verbose", "-v", action="store_true", help="show each iteration live")
    _add_cache_options(run)
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="offline demo: a needle in a 1,000,000-line haystack")
    demo.add_argument("--base-url", help="run against a real OpenAI-compatible server instead")
    demo.add_argument("--model", help="root model for --base-url")
    demo.add_argument("--recursive-model", help="sub model for --base-url")
    demo.add_argument("--api-key", help="API key for --base-url (default: OPENAI_API_KEY)")
    demo.add_argument("--lines", type=int, default=1_000_000, help="haystack size in lines")
    demo.add_argument("--latency", type=float, default=0.5, help="simulated latency per call (offline)")
    demo.add_argument("--sandbox", choices=["local", "process"], default=None)
    demo.add_argument("--log-dir", default="rlm_logs")
    demo.add_argument("--quiet", "-q", action="store_true", help="no live trajectory")
    demo.set_defaults(func=cmd_demo)

    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server whose model is an RLM")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (beyond loopback needs --auth-key)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    srv.add_argument("--auth-key", default=None,
                     help="bearer key clients must send (default: RLM_SERVE_AUTH_KEY; none on loopback)")
    srv.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body, in MB (413 beyond)")
    srv.add_argument("--max-running", type=int, default=8, help="RLM runs at once")
    srv.add_argument("--max-queue", type=int, default=32, help="requests waiting for a run slot (429 beyond)")
    _add_upstream_args(srv)
    _add_server_args(srv)
    srv.set_defaults(func=cmd_serve)

    mcp = sub.add_parser("mcp", help="an MCP server: rlm_query and a sandboxed REPL for agents")
    mcp.add_argument("--http", metavar="HOST:PORT", default=None,
                     help="serve streamable HTTP at http://HOST:PORT/mcp instead of stdio")
    mcp.add_argument("--auth-key", default=None,
                     help="with --http: bearer key clients must send (default: RLM_SERVE_AUTH_KEY)")
    mcp.add_argument("--max-sessions", type=int, default=8, help="REPL sessions open at once")
    mcp.add_argument("--session-idle-s", type=float, default=900.0,
                     help="close a REPL session idle this long")
    mcp.add_argument("--max-output-chars", type=int, default=20_000,
                     help="cut what one repl_exec returns to this many characters")
    mcp.add_argument("--cell-timeout-s", type=float, default=120.0, help="wall-clock limit of one repl_exec")
    _add_upstream_args(mcp)
    _add_server_args(mcp)
    mcp.set_defaults(func=cmd_mcp)

    view = sub.add_parser("view", help="render a JSONL trajectory log")
    view.add_argument("log", help="a .jsonl log written by a run with log_dir")
    view.add_argument("--html", metavar="OUT", help="write one self-contained HTML page instead")
    view.set_defaults(func=cmd_view)
    rp = sub.add_parser("repl", help="explore a context by hand in IPython with llm_query & co.")
    rp.add_argument("--context", required=True, help="context file, or - for standard input")
    rp.add_argument("--model", help="sub-model for llm_query (default: RLM_MODEL or gpt-4o-mini)")
    rp.add_argument("--base-url", help="OpenAI-compatible base URL")
    rp.add_argument("--api-key", help="API key (default: OPENAI_API_KEY)")
    rp.add_argument("--max-concurrency", type=int, default=64)
    rp.add_argument("--format", choices=["auto", "text", "json", "jsonl"], default="auto")
    rp.add_argument("--encoding", default="utf-8")
    _add_cache_options(rp)
    rp.set_defaults(func=cmd_repl)

    cache = sub.add_parser("cache", help="inspect or empty the sub-query cache")
    cache.add_argument("action", choices=["info", "clear"],
                       help="info: entries, size and hits; clear: remove every entry")
    cache.add_argument("dir", nargs="?", default=None,
                       help="cache directory (default: RLM_CACHE_DIR or the per-user cache dir)")
    cache.add_argument("--json", action="store_true", help="info as JSON")
    cache.set_defaults(func=cmd_cache)
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
        return 130


if __name__ == "__main__":
    sys.exit(main())
