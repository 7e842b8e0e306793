"""rlm: Recursive Language Models with a sandboxed REPL and truly async fan-out."""

from typing import Any

from rlm.core import RLM, RLMResult, RLMSession
from rlm.errors import BatchError, ConfigError, LLMError, RLMError
from rlm.llm import AsyncOpenAIClient
from rlm.repl import ExecResult, REPLEnv
from rlm.usage import Usage

__all__ = [
    "RLM",
    "AsyncOpenAIClient",
    "BatchError",
    "ConfigError",
    "ExecResult",
    "LLMError",
    "REPLEnv",
    "RLMError",
    "RLMResult",
    "RLMSession",
    "Usage",
    "load_ipython_extension",
]
__version__ = "0.1.0"


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext rlm``: registers the ``%%rlm`` and ``%rlm_config`` magics."""
    from rlm.ipython import load_ipython_extension as load

    load(ipython)
