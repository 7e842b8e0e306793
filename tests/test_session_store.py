"""Sessions that survive the process: save in one process, load in another."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from rlm import RLM
from rlm.errors import ConfigError
from rlm.session_store import assigned_names
from rlm.testing import FakeLLMServer

ROOT = "root-model"

FIRST_ASK = """```repl
counts = {"alpha": 2, 7: (1.5, None, True)}
tags = {"x", "y"}
frozen = frozenset([1, 2])
words = context.split()
weird = float("nan")
def helper(x):
    return x
big = "z" * 2_000_000
FINAL(str(len(words)))
```"""

SECOND_ASK = """```repl
try:
    has_big = str(len(big))
except NameError:
    has_big = "no big"
try:
    has_helper = "helper" if helper else ""
except NameError:
    has_helper = "no helper"
FINAL(repr((counts[7], counts["alpha"], sorted(tags), sorted(frozen), words[0], weird != weird, has_big, has_helper)))
```"""


def script(messages: list[dict[str, Any]]) -> str:
    first_user = next(m["content"] for m in messages if m["role"] == "user")
    return SECOND_ASK if "Earlier" in first_user or "second" in first_user else FIRST_ASK


CHILD = textwrap.dedent(
    """
    import json, sys
    from rlm import RLM
    url, path, sandbox = sys.argv[1:4]
    rlm = RLM(model="root-model", base_url=url, api_key="k", sandbox=sandbox)
    session = rlm.load_session(path, "one two three")
    result = session.ask("second question")
    print(json.dumps({"answer": result.answer, "history": session.history,
                      "root_calls": session.usage["root"].calls}))
    session.close()
    rlm.close()
    """
)


@pytest.mark.parametrize("sandbox", ["local", "process"])
def test_a_saved_session_continues_in_another_process(tmp_path: Path, sandbox: str) -> None:
    path = tmp_path / "session.json"
    with FakeLLMServer(scripts={ROOT: [script]}) as srv:
        rlm = RLM(model=ROOT, base_url=srv.url, api_key="k", sandbox=sandbox)
        with rlm.session("one two three") as session:
            first = session.ask("first question")
            session.save(path)
        rlm.close()
        child = subprocess.run([sys.executable, "-c", CHILD, srv.url, str(path), sandbox],
                               capture_output=True, text=True, timeout=120)
    assert first.answer == "3"
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout.strip().splitlines()[-1])
    assert out["answer"] == repr(((1.5, None, True), 2, ["x", "y"], [1, 2], "one", True,
                                  "no big", "no helper"))
    assert out["history"] == [["first question", "3"], ["second question", out["answer"]]]
    assert out["root_calls"] == 2  # the first ask's usage came along

    saved = json.loads(path.read_text())
    assert set(saved["variables"]) == {"counts", "tags", "frozen", "words", "weird"}
    assert "helper" in saved["not_saved"] and "function" in saved["not_saved"]["helper"]
    assert "big" in saved["not_saved"] and "cap" in saved["not_saved"]["big"]
    assert saved["usage"]["root"]["calls"] == 1


def test_loading_refuses_a_file_that_is_not_a_session(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"format": "something else"}))
    with FakeLLMServer() as srv:
        rlm = RLM(model=ROOT, base_url=srv.url, api_key="k", sandbox="local")
        try:
            with pytest.raises(ConfigError, match="not a saved rlm session"):
                rlm.load_session(path, "ctx")
            path.write_text(json.dumps({"format": "rlm-session", "version": 1,
                                        "variables": {"x": {"$evil": "__import__('os')"}}}))
            with pytest.raises(ConfigError, match="malformed"):
                rlm.load_session(path, "ctx")
            path.write_text(json.dumps({"format": "rlm-session", "version": 1,
                                        "variables": {"x = 1; import os; y": 1}}))
            with pytest.raises(ConfigError, match="cannot be restored"):
                rlm.load_session(path, "ctx")
        finally:
            rlm.close()


def test_assigned_names_are_the_top_level_bindings_of_a_cell() -> None:
    code = textwrap.dedent(
        """
        a = 1
        b, (c, *d) = 2, (3, 4)
        for e in range(2):
            f = e
        with open('x') as g:
            pass
        import json as h
        def i():
            inner = 1
        class J:
            attr = 1
        k = [m for m in range(3)]
        context = 'no'
        _private = 1
        """
    )
    assert assigned_names(code) == {"a", "b", "c", "d", "e", "f", "g", "h", "i", "J", "k"}
