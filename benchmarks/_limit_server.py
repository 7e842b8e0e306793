"""A rate-limited chat server for benchmarks/limits.py, in its own process.

Requests and tokens per minute as one bucket each (a minute's worth deep, refilled
continuously), OpenAI-style ``x-ratelimit-*`` headers on every reply and 429s with
``retry-after-ms``; a request costs its prompt characters / 4 plus ``max_tokens``.
``ECHO n`` is answered ``n``. ``GET /stats`` gives the counts. This holds only what
the benchmark needs from a provider's limits; the test suite's fake server is
rlm.testing.

    python benchmarks/_limit_server.py --rpm 24000 --tpm 0 --latency 0.1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from typing import Any

from aiohttp import web


class Limits:
    """One request bucket and one token bucket (0: unlimited), with counts."""

    def __init__(self, rpm: float, tpm: float, burst_s: float) -> None:
        self.rpm, self.tpm = rpm, tpm
        self.req_cap = rpm * burst_s / 60 if rpm else 0.0
        self.tok_cap = tpm * burst_s / 60 if tpm else 0.0
        self.req, self.tok, self.at = self.req_cap, self.tok_cap, time.monotonic()
        self.requests = self.refused = self.in_flight = self.peak = 0

    def take(self, cost: float) -> tuple[bool, dict[str, str]]:
        now = time.monotonic()
        elapsed, self.at = now - self.at, now
        if self.rpm:
            self.req = min(self.req_cap, self.req + elapsed * self.rpm / 60)
        if self.tpm:
            self.tok = min(self.tok_cap, self.tok + elapsed * self.tpm / 60)
        ok = (not self.rpm or self.req >= 1) and (not self.tpm or self.tok >= cost)
        wait = 0.0
        if ok:
            self.req -= 1 if self.rpm else 0
            self.tok -= cost if self.tpm else 0
        else:
            self.refused += 1
            if self.rpm:
                wait = max(wait, (1 - self.req) * 60 / self.rpm)
            if self.tpm:
                wait = max(wait, (cost - self.tok) * 60 / self.tpm)
        headers = {}
        if self.rpm:
            headers.update({
                "x-ratelimit-limit-requests": str(int(self.rpm)),
                "x-ratelimit-remaining-requests": str(max(0, int(self.req))),
                "x-ratelimit-reset-requests": f"{(self.req_cap - self.req) * 60 / self.rpm:.3f}s",
            })
        if self.tpm:
            headers.update({
                "x-ratelimit-limit-tokens": str(int(self.tpm)),
                "x-ratelimit-remaining-tokens": str(max(0, int(self.tok))),
                "x-ratelimit-reset-tokens": f"{(self.tok_cap - self.tok) * 60 / self.tpm:.3f}s",
            })
        if not ok:
            headers["retry-after-ms"] = str(int(wait * 1000) + 1)
        return ok, headers


def _text(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else ""


def make_app(limits: Limits, latency: float) -> web.Application:
    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        limits.requests += 1
        limits.in_flight += 1
        limits.peak = max(limits.peak, limits.in_flight)
        try:
            prompt = sum(len(_text(m)) for m in body.get("messages", ()))
            ok, headers = limits.take(prompt / 4 + int(body.get("max_tokens") or 16))
            await asyncio.sleep(latency)
            if not ok:
                return web.json_response(
                    {"error": {"message": "Rate limit reached", "type": "requests",
                               "code": "rate_limit_exceeded"}}, status=429, headers=headers)
            last = _text(body["messages"][-1])
            text = last[5:] if last.startswith("ECHO ") else "ok"
            return web.json_response({
                "id": "x", "object": "chat.completion", "model": body.get("model", "m"),
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": prompt // 4, "completion_tokens": 1,
                          "total_tokens": prompt // 4 + 1},
            }, headers=headers)
        finally:
            limits.in_flight -= 1

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"requests": limits.requests, "faults_served": limits.refused,
                                  "peak_in_flight": limits.peak})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/stats", stats)
    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rpm", type=float, default=0.0)
    parser.add_argument("--tpm", type=float, default=0.0)
    parser.add_argument("--burst-s", type=float, default=60.0,
                        help="bucket depth in seconds of refill (60: a minute's worth)")
    parser.add_argument("--latency", type=float, default=0.1)
    args = parser.parse_args()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))

    async def serve() -> None:
        runner = web.AppRunner(make_app(Limits(args.rpm, args.tpm, args.burst_s), args.latency),
                               access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock, backlog=4096).start()
        print(json.dumps({"url": f"http://127.0.0.1:{sock.getsockname()[1]}/v1"}), flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
