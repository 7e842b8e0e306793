"""Runs one ``rlm bench`` task with the official ``rlms`` package, in that package's interpreter.

``rlm.bench.methods.run_rlms`` starts ``python -I rlms_driver.py`` on the interpreter
that has ``rlms`` installed (whose top-level ``rlm`` package is theirs, not this
project's), writes one JSON spec to its stdin and reads one JSON line from its stdout:
``{"answer", "error", "usage": {model: {"calls", "input_tokens", "output_tokens"}}}``. This file must import nothing from this project: it runs where this
project's ``rlm`` is not importable. It holds no scoring and no pricing.

The spec: ``model``, ``recursive_model``, ``base_url``, ``max_iterations``, ``query``,
and the context as ``context`` or as ``tasks_file`` plus the byte ``offset`` of the
task's line (the API key comes in OPENAI_API_KEY).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def _context(spec: dict[str, Any]) -> Any:
    if "context" in spec:
        return spec["context"]
    with open(spec["tasks_file"], "rb") as fh:
        fh.seek(int(spec["offset"]))
        return json.loads(fh.readline())["context"]


def _backend(model: str, spec: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"model_name": model, "api_key": os.environ.get("OPENAI_API_KEY")}
    if spec.get("base_url"):
        kwargs["base_url"] = spec["base_url"]
    return kwargs


def _usage(result: Any) -> dict[str, dict[str, int]]:
    summary = getattr(result, "usage_summary", None)
    per_model = getattr(summary, "model_usage_summaries", None) or {}
    return {
        name: {"calls": int(getattr(u, "total_calls", 0) or 0),
               "input_tokens": int(getattr(u, "total_input_tokens", 0) or 0),
               "output_tokens": int(getattr(u, "total_output_tokens", 0) or 0)}
        for name, u in per_model.items()
    }


def main() -> int:
    """Read the spec, run the task, print one JSON line."""
    from rlm import RLM  # the official package: this runs on its interpreter

    spec = json.loads(sys.stdin.read())
    options: dict[str, Any] = {
        "backend": "openai",
        "backend_kwargs": _backend(spec["model"], spec),
        "environment": "local",
        "max_iterations": int(spec.get("max_iterations") or 20),
    }
    sub = spec.get("recursive_model")
    if sub and sub != spec["model"]:
        options["other_backends"] = ["openai"]
        options["other_backend_kwargs"] = [_backend(sub, spec)]
    out: dict[str, Any] = {"answer": None, "error": None, "usage": {}}
    try:
        result = RLM(**options).completion(_context(spec), root_prompt=spec["query"])
        out["answer"] = getattr(result, "response", None)
        out["usage"] = _usage(result)
    except Exception as exc:  # noqa: BLE001 - reported to the bench as the cell's error
        out["error"] = f"{type(exc).__name__}: {exc}"[:500]
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
