"""rlm: Recursive Language Models with a sandboxed REPL and truly async fan-out."""

from rlm.errors import BatchError, ConfigError, LLMError, RLMError
from rlm.llm import AsyncOpenAIClient, Usage
from rlm.repl import ExecResult, REPLEnv

__all__ = [
    "AsyncOpenAIClient",
    "BatchError",
    "ConfigError",
    "ExecResult",
    "LLMError",
    "REPLEnv",
    "RLMError",
    "Usage",
]
__version__ = "0.1.0"
