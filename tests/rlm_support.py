"""What the scripted-root tests share: model names, root replies, an RLM on a FakeLLMServer.

The `closing` fixture that closes what `make_rlm` builds lives in conftest.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from typing_extensions import TypedDict  # pydantic needs this form of TypedDict before 3.12

from rlm import RLM, AsyncOpenAIClient
from rlm.testing import FakeLLMServer

ROOT = "root-model"
SUB = "sub-model"


def repl(code: str, text: str = "Next step.") -> str:
    """A root-model reply: ``text``, then ``code`` in a ```repl block."""
    return f"{text}\n```repl\n{code}\n```"


def last_user(messages: list[dict[str, Any]]) -> str:
    """The content of the last user message a model was sent."""
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def make_rlm(srv: FakeLLMServer, made: list[RLM] | None = None, **kw: Any) -> RLM:
    """An RLM whose root (ROOT) and sub (SUB) clients both talk to ``srv``, local sandbox.

    Client options come out of ``kw``: ``prices`` (both clients), ``max_retries`` (root,
    default 0), ``max_concurrency`` (sub, default 64) and ``sub_max_retries`` (sub, default
    0); the rest go to RLM. Given ``made`` (the ``closing`` fixture), the RLM is appended
    to it, so that its clients are closed at teardown.
    """
    prices = kw.pop("prices", None)
    root = AsyncOpenAIClient(model=ROOT, api_key="k", base_url=srv.url, max_retries=kw.pop("max_retries", 0),
                             prices=prices)
    sub = AsyncOpenAIClient(model=SUB, api_key="k", base_url=srv.url, max_concurrency=kw.pop("max_concurrency", 64),
                            max_retries=kw.pop("sub_max_retries", 0), prices=prices)
    kw.setdefault("sandbox", "local")
    rlm = RLM(model=ROOT, recursive_model=SUB, client=root, sub_client=sub, **kw)
    if made is not None:
        made.append(rlm)
    return rlm


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a zombie counts: it is not reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# Schemas for typed answers. No docstrings: pydantic would put them in the schema text.
class Counted(BaseModel):
    count: int
    ids: list[str]


class Totals(TypedDict):
    total: int
    currency: str
