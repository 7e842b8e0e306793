"""``open()`` for cells of a confined worker: file names only, never descriptors.

A confined worker's cells may open files because its private root (the jail), not the
policy, bounds what they reach. But a descriptor number reaches whatever the process
holds open, the worker's channel to the host included, so here only a file *name* (a
``str``) opens anything: no int descriptor, no bytes path, no ``opener``, no
``closefd``. The file objects handed out are built on ``JailFile``, a ``FileIO`` that
refuses the same, so ``type(f)(3, "wb")`` (the class is reachable through ``type``)
opens no descriptor either.

This module holds only that; which namespaces get it is ``safe_builtins``' decision.
"""

from __future__ import annotations

import io
import operator
import os
from typing import Any

from rlm.sandbox.plaindata import exact_str

__all__ = ["JailFile", "jail_open"]

_MODE_CHARS = frozenset("axrwb+t")


def _file_name(file: Any) -> str:
    if not issubclass(type(file), str):
        raise TypeError(
            f"open() takes a file name (a str) in the sandbox, not {type(file).__name__}: "
            "file descriptors and bytes paths are not available"
        )
    return exact_str(file)


class JailFile(io.FileIO):
    """The raw file of the sandbox's ``open()``: a ``FileIO`` opened by name only."""

    def __init__(self, file: Any, mode: Any = "r", closefd: Any = True, opener: Any = None) -> None:
        name = _file_name(file)
        if closefd is not True or opener is not None:
            raise TypeError("open() in the sandbox takes no closefd or opener argument")
        super().__init__(name, exact_str(mode, "mode"))


def jail_open(
    file: Any,
    mode: Any = "r",
    buffering: Any = -1,
    encoding: Any = None,
    errors: Any = None,
    newline: Any = None,
) -> Any:
    """Open file ``file`` (a name, relative to the private root) like the built-in
    ``open``, with the same modes, buffering and text options; file descriptors, bytes
    paths, ``opener`` and ``closefd`` are refused with a TypeError."""
    name = _file_name(file)
    mode = exact_str(mode, "mode")
    chars = set(mode)
    if not mode or chars - _MODE_CHARS or len(chars) != len(mode):
        raise ValueError(f"invalid mode: {mode!r}")
    kinds = [c for c in "xrwa" if c in chars]
    if len(kinds) != 1:
        raise ValueError("must have exactly one of create/read/write/append mode")
    text, binary = "t" in chars, "b" in chars
    if text and binary:
        raise ValueError("can't have text and binary mode at once")
    options = {"encoding": encoding, "errors": errors, "newline": newline}
    if binary:
        for what, value in options.items():
            if value is not None:
                raise ValueError(f"binary mode doesn't take an {what} argument")
    else:
        options = {k: None if v is None else exact_str(v, k) for k, v in options.items()}
    buffering = operator.index(buffering)
    updating = "+" in chars
    raw = JailFile(name, kinds[0] + ("+" if updating else ""))
    try:
        line_buffering = buffering == 1 or (buffering < 0 and raw.isatty())
        if buffering < 0 or buffering == 1:
            size = os.fstat(raw.fileno()).st_blksize
            buffering = size if size > 1 else io.DEFAULT_BUFFER_SIZE
        if buffering == 0:
            if binary:
                return raw
            raise ValueError("can't have unbuffered text I/O")
        buffer: io.BufferedIOBase
        if updating:
            buffer = io.BufferedRandom(raw, buffering)
        elif kinds[0] == "r":
            buffer = io.BufferedReader(raw, buffering)
        else:
            buffer = io.BufferedWriter(raw, buffering)
        if binary:
            return buffer
        wrapper = io.TextIOWrapper(
            buffer,
            io.text_encoding(options["encoding"]),
            options["errors"],
            options["newline"],
            line_buffering,
        )
        wrapper.mode = mode
        return wrapper
    except BaseException:
        raw.close()
        raise
