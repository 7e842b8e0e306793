"""What the server tests share: the scripted upstream models and a server subprocess."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rlm.testing import Fault

ROOT, HANG_ROOT, TYPED_ROOT, SUB = "root", "root-hang", "root-typed", "sub"
# Roots that never call FINAL in their 20 turns: the last turn replies with code, or
# with a FINAL written as text.
LOOP_ROOT, LOOP_FINAL_ROOT = "root-loop", "root-loop-final"
NEEDLE = "TANGO-4242-LIMA"
QUERY = "What is the secret passphrase?"

NEEDLE_SCRIPT = [
    """Split and fan out.
```repl
lines = context.splitlines()
chunks = ["\\n".join(lines[i:i + 500]) for i in range(0, len(lines), 500)]
replies = llm_query_batch(["FIND passphrase, or NONE:\\n" + c for c in chunks])
hits = [r for r in replies if r != "NONE"]
print(len(chunks), "chunks;", hits)
```""",
    """Found it.
```repl
FINAL(hits[0])
```""",
]
# The same search, answering with an object for runs that ask for a schema.
TYPED_SCRIPT = [NEEDLE_SCRIPT[0], 'Found it.\n```repl\nFINAL({"passphrase": hits[0], "chunks": len(chunks)})\n```']
FOUND_SCHEMA = {
    "type": "object",
    "properties": {"passphrase": {"type": "string"}, "chunks": {"type": "integer"}},
    "required": ["passphrase", "chunks"],
    "additionalProperties": False,
}
HANG_SCRIPT = ["Waiting.\n```repl\nr = llm_query_batch(['HANG 1', 'HANG 2', 'HANG 3'])\n```"]
LOOP_CODE = "Still looking.\n```repl\nprint(len(context))\n```"
LOOP_FINAL_SCRIPT = [LOOP_CODE] * 20 + ["FINAL(my best guess)"]


def scripts() -> dict[str, list[str]]:
    """The upstream's root-model scripts, by model name."""
    return {ROOT: NEEDLE_SCRIPT, HANG_ROOT: HANG_SCRIPT, TYPED_ROOT: TYPED_SCRIPT,
            LOOP_ROOT: [LOOP_CODE], LOOP_FINAL_ROOT: LOOP_FINAL_SCRIPT}


def haystack(lines: int = 3000) -> str:
    rows = [f"{i:05d} INFO nothing to see on line {i}" for i in range(lines)]
    rows[lines * 2 // 3] = f"{lines * 2 // 3:05d} WARN the secret passphrase is: {NEEDLE}"
    return "\n".join(rows)


def needle_messages() -> list[Any]:
    """A chat whose system message is the haystack and whose user message asks for the needle."""
    return [{"role": "system", "content": haystack()}, {"role": "user", "content": QUERY}]


def sub_model(messages: list[dict[str, Any]]) -> str | Fault:
    text = messages[-1]["content"]
    if text.startswith("HANG"):
        return Fault("hang")
    if text.startswith("ECHO "):
        return text[5:]
    found = re.search(r"secret passphrase is: (\S+)", text)
    return found.group(1) if found else "NONE"


class RlmProcess:
    """An ``rlm`` server subprocess; its stderr is drained on a thread (it must never block)."""

    def __init__(self, args: list[str], ready: str) -> None:
        cmd = [sys.executable, "-m", "rlm.cli", *args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._pattern = re.compile(ready)
        self.match: re.Match[str] | None = None
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._ready.wait(60) or self.match is None:
            self.stop()
            raise RuntimeError("rlm server did not start:\n" + "".join(self.lines))

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if self.match is None and (m := self._pattern.search(line)):
                self.match = m
                self._ready.set()
        self._ready.set()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextmanager
def rlm_server(args: list[str], ready: str) -> Iterator[str]:
    """Run ``rlm <args>`` until the block ends; yield the URL its ``ready`` line names.

    The server must then stop cleanly (exit 0); its stderr is shown if not.
    """
    server = RlmProcess(args, ready=ready)
    try:
        assert server.match is not None
        yield server.match.group(1)
    finally:
        assert server.stop() == 0, "".join(server.lines)


@contextmanager
def serve_process(upstream_url: str, key: str, *extra: str) -> Iterator[str]:
    """``rlm serve`` on a free port with ``key``, over the scripted upstream at
    ``upstream_url`` (ROOT and SUB), plus ``extra`` flags; yields its base URL."""
    with rlm_server(
        ["serve", "--port", "0", "--auth-key", key, "--base-url", upstream_url, "--api-key", "upstream-key",
         "--model", ROOT, "--recursive-model", SUB, *extra],
        ready=r"listening on (http://\S+/v1)",
    ) as url:
        yield url
