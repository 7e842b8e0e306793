"""rlm: Recursive Language Models with a sandboxed REPL and truly async fan-out.

The public names are imported on first use (PEP 562 ``__getattr__``): ``import rlm``
and the ``rlm`` command's help and viewer stay fast because nothing here loads the
OpenAI SDK until a client, an RLM or a REPLEnv is actually asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlm.core import RLM
    from rlm.errors import BatchError, ConfigError, LLMError, RLMError
    from rlm.llm import AsyncOpenAIClient
    from rlm.repl import ExecResult, REPLEnv
    from rlm.result import RLMResult
    from rlm.session import RLMSession
    from rlm.testing import FakeLLMServer
    from rlm.usage import Usage

__all__ = [
    "RLM",
    "AsyncOpenAIClient",
    "BatchError",
    "ConfigError",
    "ExecResult",
    "FakeLLMServer",
    "LLMError",
    "REPLEnv",
    "RLMError",
    "RLMResult",
    "RLMSession",
    "Usage",
    "load_ipython_extension",
]
__version__ = "0.1.0"

# Where each public name lives; a name is imported from its module the first time it
# is read, then cached in this module's globals.
_LAZY = {
    "RLM": "rlm.core",
    "RLMResult": "rlm.result",
    "RLMSession": "rlm.session",
    "BatchError": "rlm.errors",
    "ConfigError": "rlm.errors",
    "LLMError": "rlm.errors",
    "RLMError": "rlm.errors",
    "AsyncOpenAIClient": "rlm.llm",
    "Usage": "rlm.usage",
    "ExecResult": "rlm.repl",
    "REPLEnv": "rlm.repl",
    "FakeLLMServer": "rlm.testing",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    # The public names and the module's own dunders; not the helpers this file imports.
    dunders = {name for name in globals() if name.startswith("__") and name.endswith("__")}
    return sorted(dunders | set(__all__))


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext rlm``: registers the ``%%rlm`` and ``%rlm_config`` magics."""
    from rlm.ipython import load_ipython_extension as load

    load(ipython)
