"""Which files a remote client may read as a context: only those under ``--allow-dir``.

A request names a path; a server started without ``--allow-dir`` reads none. A path is
checked three times, because the client is an attacker who knows this code: lexically
(``..`` folded, before touching the disk, so a refusal does not reveal whether a file
exists outside), after resolving every symlink (a link inside pointing outside is
refused), and on Linux once more on the opened descriptor itself (a directory swapped
for a symlink between the check and the open is caught). Only regular files are read
(a FIFO would block the server), up to a size limit, as UTF-8 text.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Iterable
from pathlib import Path

from rlm.errors import AccessDeniedError, ConfigError

__all__ = ["AllowedDirs"]


class AllowedDirs:
    """The directories a server may read context files from, and the reader itself.

    ``dirs`` must exist; each is resolved once at start. ``max_bytes`` caps the size of
    one context file. A relative path in a request is taken relative to the first
    directory.
    """

    def __init__(self, dirs: Iterable[str | os.PathLike[str]], max_bytes: int = 256 * 1024 * 1024) -> None:
        roots: list[Path] = []
        for raw in dirs:
            path = Path(raw).expanduser()
            if not path.is_dir():
                raise ConfigError(f"--allow-dir {raw}: not an existing directory")
            roots.append(path.resolve(strict=True))
        self.roots: tuple[Path, ...] = tuple(roots)
        self.max_bytes = max_bytes

    def __bool__(self) -> bool:
        return bool(self.roots)

    def _inside(self, path: Path) -> bool:
        return any(path == root or path.is_relative_to(root) for root in self.roots)

    def resolve(self, requested: str) -> Path:
        """The real path of ``requested`` if it lies under an allowed directory.

        Raises ``AccessDeniedError`` (with a message fit to send back to the client)
        when reading files is disabled, the path lies outside or a symlink leads
        outside, and ``FileNotFoundError`` (a message as well) when a path inside does
        not exist: servers answer that one as "not found", not as a refusal.
        """
        if not self.roots:
            raise AccessDeniedError(
                "context_path is disabled on this server: start it with --allow-dir DIR to "
                "let clients read files under DIR"
            )
        if not isinstance(requested, str) or not requested or "\x00" in requested:
            raise AccessDeniedError("context_path must be a non-empty path string")
        candidate = Path(requested).expanduser()
        if not candidate.is_absolute():
            candidate = self.roots[0] / candidate
        lexical = Path(os.path.normpath(candidate))
        if not self._inside(lexical):
            raise AccessDeniedError(f"context_path {requested!r} is outside the allowed directories")
        try:
            real = lexical.resolve(strict=True)
        except (FileNotFoundError, NotADirectoryError):
            raise FileNotFoundError(
                f"context_path {requested!r} does not exist (a relative path is taken under "
                f"{self.roots[0]})"
            ) from None
        except (OSError, RuntimeError) as exc:  # a symlink loop, a permission problem
            raise AccessDeniedError(f"context_path {requested!r} cannot be resolved: {exc}") from None
        if not self._inside(real):
            raise AccessDeniedError(
                f"context_path {requested!r} resolves (through a symlink) outside the allowed directories"
            )
        return real

    def read_text(self, requested: str) -> str:
        """Read the allowed file ``requested`` as UTF-8 text; see ``resolve`` for the checks
        and errors."""
        real = self.resolve(requested)
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(real, flags)
        except OSError as exc:
            raise AccessDeniedError(f"context_path {requested!r} cannot be opened: {exc.strerror}") from None
        with contextlib.ExitStack() as stack:
            stack.callback(os.close, fd)
            opened = _path_of_descriptor(fd)
            if opened is not None and not self._inside(opened):
                raise AccessDeniedError(
                    f"context_path {requested!r} changed to point outside the allowed directories"
                )
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise AccessDeniedError(f"context_path {requested!r} is not a regular file")
            if info.st_size > self.max_bytes:
                raise AccessDeniedError(
                    f"context_path {requested!r} is {info.st_size:,} bytes; this server reads at most "
                    f"{self.max_bytes:,} (its --max-context-mb)"
                )
            with os.fdopen(os.dup(fd), "rb") as fh:
                raw = fh.read(self.max_bytes + 1)
        if len(raw) > self.max_bytes:
            raise AccessDeniedError(f"context_path {requested!r} grew past {self.max_bytes:,} bytes")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise AccessDeniedError(
                f"context_path {requested!r} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                f"{exc.start}); send text files only"
            ) from None


def _path_of_descriptor(fd: int) -> Path | None:
    # Linux names the file a descriptor really opened; elsewhere the resolve check stands alone.
    if not sys.platform.startswith("linux"):
        return None
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None
