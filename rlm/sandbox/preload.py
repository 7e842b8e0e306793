"""What the zygote imports and warms up once, so that no worker ever needs the filesystem.

A worker's root is its own empty private directory, so every module a cell may reach
(through the policy's facades), every codec, the data libraries when installed and the
policy's own lazily imported paths are loaded here, in the template process, before the
jail exists; workers share those pages with it. This module holds only that loading:
no confinement (see ``confine``) and no process management (see ``zygote``).
"""

from __future__ import annotations

import contextlib
import os
import time

__all__ = ["PRELOAD", "preload"]


# Modules a cell may reach only through the policy. They are imported here, before the
# fork, so a worker never touches the filesystem to import (its root is its own empty
# working directory) and every worker shares their pages with the zygote.
PRELOAD = (
    "asyncio",
    "base64",
    "bisect",
    "collections",
    "collections.abc",
    "copy",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "enum",
    "fractions",
    "functools",
    "hashlib",
    "heapq",
    "itertools",
    "json",
    "math",
    "numbers",
    "operator",
    "random",
    "re",
    "statistics",
    "string",
    "textwrap",
    "time",
    "traceback",
    "typing",
    "unicodedata",
    "_strptime",
    "resource",
    "concurrent.futures",
    "rlm.sandbox.compiler",
    "rlm.sandbox.guards",
    "rlm.sandbox.safe_builtins",
    "rlm.sandbox.modules",
    "rlm.sandbox.subqueries",
    "rlm.sandbox.cells",
    "rlm.sandbox.local",
    "rlm.sandbox.flow",
)



def _preload_data_modules() -> None:
    """Import numpy, pandas and yaml when installed, before the jail hides site-packages.

    Their math libraries would start a thread pool per core on import, and threads do
    not survive a fork; one thread each is what a worker wants anyway. The variables
    are removed again so workers still start with an empty environment.
    """
    import importlib

    from rlm.sandbox.modules import DATA_MODULES

    single = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
    added = [name for name in single if name not in os.environ]
    for name in added:
        os.environ[name] = "1"
    try:
        for name in DATA_MODULES:
            with contextlib.suppress(Exception):
                importlib.import_module(name)
    finally:
        for name in added:
            os.environ.pop(name, None)


def preload() -> None:
    """Import and warm up everything a worker may need, in the zygote, before any fork."""
    import importlib

    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    _preload_data_modules()
    # Codecs load lazily by name; inside the jail no module can be found later, so load
    # them all now (a cell may call str.encode with any codec name).
    import encodings
    import pkgutil

    for info in pkgutil.iter_modules(encodings.__path__):
        with contextlib.suppress(Exception):
            importlib.import_module(f"encodings.{info.name}")
    # OpenSSL reads its configuration on first use; do it while files are reachable.
    import hashlib

    for algo in ("md5", "sha1", "sha256", "sha512"):
        with contextlib.suppress(ValueError):
            hashlib.new(algo, b"")
    time.localtime()
    _warm_policy()


def _warm_policy() -> None:
    """Run the policy once in the zygote: every allowed import, a top-level await, an error.

    Module facades are built and cached here, and any module the policy or the stdlib
    imports lazily on those paths is loaded, so a worker never needs the filesystem.
    """
    import asyncio

    from rlm.sandbox import cells, compiler, modules

    allowed = [m for m in modules.ALLOWED_MODULES if m != "__future__"]
    source = "".join(f"import {m}\n" for m in allowed) + (
        "import datetime\n"
        "datetime.datetime.strptime('2024-01-02', '%Y-%m-%d')\n"
        "'é'.encode('latin-1')\n"
        "async def warm():\n"
        "    return 1\n"
        "x = await warm()\n"
        "undefined_name\n"
    )
    sink: list[str] = []
    ns = cells.build_namespace(write_stdout=sink.append, write_stderr=sink.append, extra={})
    loop = asyncio.new_event_loop()
    try:
        cell = compiler.compile_cell(source, "<warm-up>")
        try:
            cells.run_cell(cell, ns, loop)
        except BaseException as exc:  # noqa: BLE001 - the NameError is the point
            cells.format_user_error(exc, cell, ns)
        with contextlib.suppress(compiler.PolicyError):
            compiler.compile_cell("def f(:\n", "<warm-up>")
        cells.timeout_reason(1.0)
    finally:
        loop.close()
