"""RLMSession: multi-turn work over one context, with one REPL kept across questions.

It holds the session (its REPLEnv, the questions and answers so far, their usage, the
names its cells assigned) and opening one from a saved file. It must not hold the
file format or the encoding of variables (``rlm.session_store``), nor the run itself
(``rlm.run``): each ask is an ordinary run of the RLM in the session's env.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlm import loop as engine
from rlm.result import RLMResult
from rlm.session_store import assigned_names, read_session, save_session
from rlm.usage import Usage

if TYPE_CHECKING:
    # Annotations only: a session is handed its RLM; it never imports the facade.
    from rlm.core import RLM

__all__ = ["RLMSession", "load_session"]


class RLMSession:
    """Multi-turn work over one context: one REPLEnv kept across ``ask`` calls.

    Each ask is a fresh root conversation that is told the earlier questions and
    answers; the REPL keeps every variable, so later asks build on earlier work.
    """

    def __init__(self, rlm: RLM, context: Any) -> None:
        self.rlm = rlm
        self.context = context
        self.history: list[tuple[str, str]] = []
        # Usage of every ask so far (kept across save/load), and the names the session's
        # cells assigned: what ``save`` looks for in the REPL.
        self.usage: dict[str, Usage] = {"root": Usage(), "sub": Usage()}
        self.variable_names: set[str] = set()
        # Each ask gives the env that run's sub-query service.
        self.env = rlm.new_env(context)

    def ask(self, query: str, schema: Any = None) -> RLMResult:
        """Ask the next question (sync; works inside a running loop too); ``schema`` as
        for ``RLM.completion``."""
        return engine.run_sync(self.aask(query, schema=schema))

    async def aask(self, query: str, schema: Any = None) -> RLMResult:
        """Ask the next question; ``schema`` asks for a typed answer."""
        result = await self.rlm.acompletion(
            self.context, query, schema, env=self.env, history=self.history
        )
        if result.answer is not None:
            self.history.append((query, result.answer))
        self.usage = {k: self.usage[k] + result.usage[k] for k in ("root", "sub")}
        for event in result.trajectory:
            if event.get("type") == "cell" and "child_run" not in event:
                self.variable_names |= assigned_names(event.get("code") or "")
        return result

    def save(self, path: str | Path) -> Path:
        """Save the history, the usage and the plain-data REPL variables to ``path`` (JSON).

        Variables that are not plain data (str, numbers, bool, None and lists, tuples,
        dicts and sets of them, each within 1,000,000 characters of JSON) are listed in
        the file's ``not_saved`` with the reason. ``RLM.load_session`` reads it back.
        """
        return save_session(self, path)

    def close(self) -> None:
        """Close the session's REPL."""
        self.env.close()

    def __enter__(self) -> RLMSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_session(rlm: RLM, path: str | os.PathLike[str], context: Any) -> RLMSession:
    """A new session of ``rlm`` over ``context`` with the saved history, usage and plain
    variables of ``path`` restored; raises ``ConfigError`` for a file that is not one
    (before any REPL is started)."""
    saved = read_session(path, rlm.tools)
    session = RLMSession(rlm, context)
    try:
        saved.restore(session)
    except BaseException:
        session.close()
        raise
    return session
