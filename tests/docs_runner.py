"""Runs one unit of documentation examples, in its own process, in the current directory.

Usage: ``python docs_runner.py UNIT.json``; the file holds a list of blocks (``path``,
``line``, ``kind``, ``text``, ``background``, ``repl``) that run in order in this
process: Python blocks share one namespace (top-level ``await`` runs on one event loop
kept for the unit, as in a notebook), ``ipython`` blocks run in an IPython shell on the
same namespace, shell blocks in ``bash -e -o pipefail``, background shell blocks stay up
until the unit ends, and ``repl`` blocks run as a cell of a REPLEnv over ``big.txt``.
The first failure prints ``EXAMPLE FAILED path:line: why`` and what the block printed,
and the runner exits 1. It must not parse Markdown (``docs_support``) or start the fake
server (the test does, and passes it in the environment).
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import linecache
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path
from typing import Any

# Where each process group this runner starts is written down, so the test can end them
# even when it had to kill the runner itself (a unit past its timeout).
GROUPS_FILE = "DOCS_EXAMPLE_GROUPS"
_PORT = re.compile(r"--port[ =](\d+)|--http[ =][\w.\[\]:]*?:(\d+)\b")


class ExampleFailed(Exception):
    """The block at ``where`` did not run; the message says why."""

    def __init__(self, where: str, why: str) -> None:
        super().__init__(f"{where}: {why}")


def _where(block: dict[str, Any]) -> str:
    return f"{block['path']}:{block['line']}"


def _port_of(text: str) -> int | None:
    found = _PORT.search(text)
    if not found:
        return None
    return int(found.group(1) or found.group(2))


def _started(proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    path = os.environ.get(GROUPS_FILE)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{proc.pid}\n")
    return proc


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class Runner:
    """One unit's state: the namespace, the event loop, the servers it started."""

    def __init__(self) -> None:
        # The blocks run as the __main__ module, as a script does: pydantic and pickle
        # look a class's names up in the module it was defined in.
        main = types.ModuleType("__main__")
        sys.modules["__main__"] = main
        self.namespace: dict[str, Any] = main.__dict__
        self.loop = asyncio.new_event_loop()
        self.shell: Any = None
        self.background: list[tuple[subprocess.Popen[bytes], Any]] = []
        self.envs: list[Any] = []
        self.clients: list[Any] = []

    def run(self, block: dict[str, Any]) -> None:
        kind = block["kind"]
        if block.get("repl"):
            self.run_repl(block)
        elif kind == "python":
            self.run_python(block)
        elif kind == "ipython":
            self.run_ipython(block)
        elif block.get("background"):
            self.start_background(block)
        else:
            self.run_shell(block)

    def run_python(self, block: dict[str, Any]) -> None:
        filename = block["path"]
        # Blank lines in front so a traceback's line numbers are the Markdown file's.
        source = "\n" * (block["line"] - 1) + block["text"]
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        code = compile(source, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        try:
            if code.co_flags & inspect.CO_COROUTINE:
                self.loop.run_until_complete(eval(code, self.namespace))
            else:
                exec(code, self.namespace)
        except BaseException as exc:
            text = "".join(traceback.format_exception(exc)[-12:])
            raise ExampleFailed(_where(block), f"raised {type(exc).__name__}\n{text}") from None

    def run_ipython(self, block: dict[str, Any]) -> None:
        if self.shell is None:
            from IPython.core.interactiveshell import InteractiveShell

            self.shell = InteractiveShell.instance()
            self.shell.user_ns.update(self.namespace)
            self.namespace = self.shell.user_ns
        result = self.shell.run_cell(block["text"], store_history=False)
        if not result.success:
            error = result.error_before_exec or result.error_in_exec
            raise ExampleFailed(_where(block), f"the cell raised {error!r}")

    def run_repl(self, block: dict[str, Any]) -> None:
        from rlm import AsyncOpenAIClient, REPLEnv

        client = AsyncOpenAIClient(model="gpt-4o-mini")
        self.clients.append(client)
        env = REPLEnv(context=Path("big.txt").read_text(encoding="utf-8"), client=client)
        self.envs.append(env)
        result = env.execute(block["text"])
        if result.error:
            raise ExampleFailed(_where(block), f"the REPL cell failed:\n{result.error}")

    def run_shell(self, block: dict[str, Any]) -> None:
        with tempfile.TemporaryFile() as log:
            proc = _started(subprocess.Popen(
                ["bash", "-e", "-o", "pipefail", "-c", block["text"]],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True))
            code = proc.wait()
            # Whatever the block left running in the background ends with it.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if code != 0:
                log.seek(0)
                tail = "\n".join(log.read().decode(errors="replace").splitlines()[-40:])
                raise ExampleFailed(_where(block), f"exited {code}\n{tail}")

    def start_background(self, block: dict[str, Any]) -> None:
        port = _port_of(block["text"])
        if port is None:
            raise ExampleFailed(_where(block), "a background block must name its --port")
        log = tempfile.TemporaryFile()
        proc = _started(subprocess.Popen(["bash", "-c", block["text"]], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, start_new_session=True))
        self.background.append((proc, log))
        deadline = time.monotonic() + 60
        while not _listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                out = log.read().decode(errors="replace")[-3000:]
                state = f"exited {proc.returncode}" if proc.returncode is not None else "timed out"
                raise ExampleFailed(_where(block), f"server never listened on {port} ({state})\n{out}")
            time.sleep(0.05)

    def close(self) -> None:
        for env in self.envs:
            env.close()
        for client in self.clients:
            client.close_sync()
        for proc, log in self.background:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            log.close()
        self.loop.close()


def main(argv: list[str]) -> int:
    blocks = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    runner = Runner()
    try:
        for block in blocks:
            runner.run(block)
    except ExampleFailed as exc:
        sys.stdout.flush()
        print(f"\nEXAMPLE FAILED {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        runner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
