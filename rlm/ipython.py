"""IPython integration: ``%load_ext rlm`` magics and the ``rlm repl`` shell.

``%rlm_config`` sets model, base URL and key for the notebook; ``%%rlm`` runs an RLM
with the cell body as the query. Sync calls work inside the kernel's running loop
because all I/O happens on rlm's engine loop; nothing patches asyncio.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from rlm import loop as engine
from rlm.errors import ConfigError
from rlm.llm import AsyncOpenAIClient


@dataclass
class NotebookConfig:
    """What ``%rlm_config`` sets; unset values fall back to the environment."""

    model: str | None = None
    recursive_model: str | None = None
    base_url: str | None = None
    api_key: str | None = None
    sandbox: str | None = None

    def describe(self) -> str:
        key = self.api_key or os.environ.get("OPENAI_API_KEY")
        shown = f"{key[:3]}...{key[-4:]}" if key and len(key) > 10 else ("set" if key else "not set")
        return (
            f"model={self.model or os.environ.get('RLM_MODEL') or '(default)'} "
            f"recursive_model={self.recursive_model or '(same as model)'} "
            f"base_url={self.base_url or os.environ.get('OPENAI_BASE_URL') or '(OpenAI)'} "
            f"api_key={shown} sandbox={self.sandbox or '(default)'}"
        )


_CONFIG_KEYS = ("model", "recursive_model", "base_url", "api_key", "sandbox")


def _parse_options(line: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    """``--name value`` / ``--flag`` / ``name=value`` options of a magic line."""
    options: dict[str, Any] = {}
    tokens = shlex.split(line)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if "=" in token and not token.startswith("--"):
            name, value = token.split("=", 1)
        elif token.startswith("--"):
            name = token[2:]
            if "=" in name:
                name, value = name.split("=", 1)
            elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                value = tokens[i + 1]
                i += 1
            else:
                value = True
        else:
            raise ConfigError(f"unexpected argument {token!r}; options are: --" + ", --".join(allowed))
        name = name.replace("-", "_")
        if name not in allowed:
            raise ConfigError(f"unknown option --{name}; options are: --" + ", --".join(allowed))
        options[name] = value
        i += 1
    return options


@magics_class
class RLMMagics(Magics):
    """``%rlm_config`` and ``%%rlm``."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.config_values = NotebookConfig()

    @line_magic
    def rlm_config(self, line: str) -> None:
        """Set model, recursive_model, base_url, api_key, sandbox; no arguments shows them."""
        try:
            options = _parse_options(line, _CONFIG_KEYS)
        except ConfigError as exc:
            print(f"rlm: {exc}")
            return
        for name, value in options.items():
            setattr(self.config_values, name, value)
        print("rlm config:", self.config_values.describe())

    @cell_magic
    def rlm(self, line: str, cell: str) -> Any:
        """Run an RLM: the cell body is the query; ``--context VAR`` names the context.

        Options: ``--context VAR`` (default ``context``), ``--model``, ``--base-url``,
        ``--verbose``, ``--out NAME`` (default ``_rlm``). Returns the RLMResult, which
        renders as HTML.
        """
        from rlm.core import RLM

        try:
            options = _parse_options(line, ("context", "model", "base_url", "verbose", "out",
                                            "recursive_model", "max_iterations"))
        except ConfigError as exc:
            print(f"rlm: {exc}")
            return None
        query = cell.strip()
        if not query:
            print("rlm: the cell body is the query; it is empty")
            return None
        name = options.get("context", "context")
        user_ns = self.shell.user_ns
        if name not in user_ns:
            print(f"rlm: no variable named {name!r} in the notebook; pass --context VAR")
            return None
        cfg = self.config_values
        rlm = RLM(
            model=options.get("model") or cfg.model,
            recursive_model=options.get("recursive_model") or cfg.recursive_model,
            base_url=options.get("base_url") or cfg.base_url,
            api_key=cfg.api_key,
            sandbox=cfg.sandbox,
            verbose=bool(options.get("verbose")),
            max_iterations=int(options.get("max_iterations", 20)),
        )
        try:
            result = rlm.completion(context=user_ns[name], query=query)
        finally:
            rlm.close()
        user_ns[options.get("out", "_rlm")] = result
        return result


def load_ipython_extension(ipython: Any) -> None:
    """Called by ``%load_ext rlm``."""
    ipython.register_magics(RLMMagics)


def repl_namespace(context: Any, client: AsyncOpenAIClient) -> dict[str, Any]:
    """The names a person gets in ``rlm repl``: the same tools the root model gets.

    Here the person is trusted, so these are plain functions over one shared client;
    Ctrl-C during a sync call cancels the in-flight requests on the engine loop.
    """

    def llm_query(prompt: str, **params: Any) -> str:
        """Ask the sub-model one question."""
        return engine.run_sync(client.completion(prompt, **params))

    def llm_query_batch(prompts: list[str], **params: Any) -> list[str]:
        """Ask many questions at once; failed items come back as error strings."""
        results = engine.run_sync(client.completion_batch(prompts, return_exceptions=True, **params))
        return [r if isinstance(r, str) else f"[llm_query error: {r}]" for r in results]

    async def llm_query_async(prompt: str, **params: Any) -> str:
        """Awaitable ``llm_query``."""
        return await client.completion(prompt, **params)

    async def llm_query_batch_async(prompts: list[str], **params: Any) -> list[str]:
        """Awaitable ``llm_query_batch``."""
        results = await client.completion_batch(prompts, return_exceptions=True, **params)
        return [r if isinstance(r, str) else f"[llm_query error: {r}]" for r in results]

    functions: dict[str, Callable[..., Any]] = {
        "llm_query": llm_query,
        "llm_query_batch": llm_query_batch,
        "llm_query_async": llm_query_async,
        "llm_query_batch_async": llm_query_batch_async,
    }
    return {"context": context, "client": client, **functions}


def start_repl(context: Any, client: AsyncOpenAIClient) -> None:
    """Open an interactive IPython shell to explore ``context`` by hand."""
    from IPython.terminal.embed import InteractiveShellEmbed

    size = f"{len(context):,}" if hasattr(context, "__len__") else "?"
    banner = (
        f"rlm repl: `context` is a {type(context).__name__} of length {size}.\n"
        "llm_query(prompt), llm_query_batch(prompts), await llm_query_async(prompt), "
        "await llm_query_batch_async(prompts)\n"
        f"model {client.model}; Ctrl-C cancels a running batch; Ctrl-D exits.\n"
    )
    shell = InteractiveShellEmbed(banner1=banner, exit_msg="bye", user_ns=repl_namespace(context, client))
    shell()
