"""``python -m rlm.testing``: serve the fake model until stopped.

Holds the command line (options, their validation into one-line errors with exit 2)
and the serve-until-signalled loop that prints ``READY <url>``. It must not hold server
behaviour: every option maps onto :class:`FakeLLMServer` arguments or a responder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import signal
import sys
from collections.abc import Sequence

from rlm.testing.batches import BatchOptions
from rlm.testing.faults import FAULT_KINDS
from rlm.testing.limits import Limit
from rlm.testing.responders import Responder, echo_responder, random_faults, token_bucket
from rlm.testing.scripted import rlm_responder
from rlm.testing.server import FakeLLMServer

__all__ = ["main"]


def _raise_fd_limit() -> None:
    try:
        import resource
    except ImportError:  # not on this platform: nothing to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def _serve_forever(server: FakeLLMServer) -> None:
    await server.astart()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (NotImplementedError, RuntimeError):
            signal.signal(signum, lambda *_: loop.call_soon_threadsafe(stop.set))
    print(f"READY {server.url}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.astop()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rlm.testing",
        description="Serve a fake model (OpenAI-compatible) on loopback until stopped.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument(
        "--latency-max", type=float, default=None, help="draw latency uniformly up to this"
    )
    parser.add_argument("--model", default="fake-model")
    parser.add_argument(
        "--responder", choices=["rlm", "echo"], default="rlm",
        help="rlm (default): a scripted RLM root that chunks any context and fans out, with "
        "extractive sub-answers and ECHO prompts echoed; echo: the echo responder only",
    )
    parser.add_argument("--fault-rate", type=float, default=0.0,
                        help="answer this random share of requests (0 to 1) with a fault")
    parser.add_argument("--fault-kinds", default="429,503",
                        help="the fault kinds --fault-rate draws from (comma-separated)")
    parser.add_argument("--retry-after", type=float, default=None,
                        help="Retry-After seconds on those faults")
    parser.add_argument("--retry-after-on", default="429,503",
                        help="which fault kinds carry Retry-After (comma-separated)")
    parser.add_argument("--rate-limit", type=float, default=None,
                        help="a token bucket of this many requests/s (429 beyond it)")
    parser.add_argument("--burst", type=float, default=None, help="the bucket's size")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--limit", action="append", default=[], metavar="MODEL:KEY=VALUE,...",
        help="per-model rate limits, e.g. 'gpt-5-mini:rpm=5000,tpm=2000000' or '*:rps=400' "
        "('gpt-5-mini=rpm:5000,tpm:2000000', as rlm --limit writes it, works too) "
        "(keys: rps, rpm, tpm, input_tpm, output_tpm, burst, token_burst, "
        "default_max_tokens); repeatable",
    )
    parser.add_argument(
        "--reasoning", action="append", default=[], metavar="MODEL=TOKENS",
        help="report this many reasoning tokens per reply of MODEL; repeatable",
    )
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="never report cached prompt tokens")
    parser.add_argument("--no-fast-path", action="store_true",
                        help="serve chat completions through aiohttp like every other route, "
                             "not the hand-written fast path (to compare protocols like for "
                             "like)")
    parser.add_argument("--batch-delay", type=float, default=0.0,
                        help="seconds a batch takes to complete (default: 0)")
    parser.add_argument("--batch-failure-rate", type=float, default=0.0,
                        help="share of batch lines that fail (0 to 1)")
    parser.add_argument("--batch-expire-after", type=float, default=None,
                        help="seconds after which a batch still running expires")
    return parser


def _limit_values(spec: str) -> tuple[str, dict[str, float]] | None:
    """``MODEL:KEY=N,...`` (this server's form) or ``MODEL=KEY:N,...`` (``rlm --limit``'s),
    as (model, values); None when it is neither."""
    for model, pairs, between in (spec.rpartition(":")[::2] + ("=",),
                                  spec.partition("=")[::2] + (":",)):
        if not model or not pairs:
            continue
        values: dict[str, float] = {}
        for pair in pairs.split(","):
            key, sep, raw = pair.partition(between)
            try:
                values[key.strip()] = float(raw)
            except ValueError:
                break
            if not sep or not key.strip():
                break
        else:
            return model, values
    return None


def _limits(parser: argparse.ArgumentParser, specs: Sequence[str]) -> dict[str, Limit]:
    out: dict[str, Limit] = {}
    for spec in specs:
        found = _limit_values(spec)
        if found is None:
            parser.error(f"--limit {spec!r} is not MODEL:KEY=NUMBER,... or "
                         "MODEL=KEY:NUMBER,... (MODEL may be '*')")
        model, values = found
        if "default_max_tokens" in values:
            values["default_max_tokens"] = int(values["default_max_tokens"])
        try:
            out[model] = Limit.of(values)
        except (TypeError, ValueError) as exc:
            parser.error(f"--limit {spec!r}: {exc}")
    return out


def _reasoning(parser: argparse.ArgumentParser, specs: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for spec in specs:
        model, _, raw = spec.rpartition("=")
        if not model or not raw.isdigit():
            parser.error(f"--reasoning {spec!r}: write MODEL=TOKENS (a whole number >= 0)")
        out[model] = int(raw)
    return out


def _kinds(parser: argparse.ArgumentParser, option: str, text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown:
        parser.error(
            f"{option}: unknown fault kind {unknown[0]!r}; use {', '.join(sorted(FAULT_KINDS))}"
        )
    return kinds


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT (``python -m rlm.testing``), printing exactly one line,
    ``READY http://HOST:PORT/v1``, once listening (``--port 0`` picks a free port), so a
    parent process can wait for it. Bad options print one line and exit 2. The open-file
    soft limit is raised to the hard limit first, since 10,000 concurrent connections
    need it.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.latency < 0 or (args.latency_max is not None and args.latency_max < args.latency):
        parser.error("--latency must be >= 0 and --latency-max >= --latency")
    if not 0 <= args.fault_rate <= 1:
        parser.error(f"--fault-rate must be between 0 and 1, got {args.fault_rate:g}")
    if args.rate_limit is not None and args.rate_limit <= 0:
        parser.error("--rate-limit must be > 0 requests per second")
    if args.burst is not None and args.burst < 1:
        parser.error("--burst must be >= 1")
    if args.retry_after is not None and args.retry_after < 0:
        parser.error("--retry-after must be >= 0 seconds")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0 to 65535, got {args.port}")
    kinds = _kinds(parser, "--fault-kinds", args.fault_kinds)
    retry_after_on = _kinds(parser, "--retry-after-on", args.retry_after_on)
    if args.retry_after is not None and not set(retry_after_on) <= {"429", "503", "529"}:
        parser.error("--retry-after-on: only 429, 503 and 529 faults carry Retry-After")
    try:
        batch_options = BatchOptions(
            delay=args.batch_delay,
            failure_rate=args.batch_failure_rate,
            expire_after=args.batch_expire_after,
            seed=args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))
    limits = _limits(parser, args.limit)
    reasoning = _reasoning(parser, args.reasoning)
    latency: float | tuple[float, float] = args.latency
    if args.latency_max is not None:
        latency = (args.latency, args.latency_max)
    _raise_fd_limit()
    # Importing the package pulls in aiohttp and its friends: many long-lived objects
    # that every full collection would rescan while serving. Freezing them cut the
    # server's CPU per request by about a quarter here.
    gc.collect()
    gc.freeze()
    responder: Responder = rlm_responder if args.responder == "rlm" else echo_responder
    if args.fault_rate:
        responder = random_faults(
            args.fault_rate,
            kinds=kinds,
            retry_after=args.retry_after,
            retry_after_on=retry_after_on,
            seed=args.seed,
            inner=responder,
        )
    if args.rate_limit:
        responder = token_bucket(args.rate_limit, burst=args.burst, inner=responder)
    server = FakeLLMServer(
        responder,
        latency=latency,
        host=args.host,
        port=args.port,
        model=args.model,
        limits=limits,
        reasoning=reasoning,
        prefix_cache=not args.no_prefix_cache,
        batches=batch_options,
        fast_path=not args.no_fast_path,
    )
    try:
        asyncio.run(_serve_forever(server))
    except OSError as exc:
        print(f"python -m rlm.testing: cannot listen on {args.host}:{args.port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0
