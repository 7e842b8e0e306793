"""Finding the runnable examples in Markdown: fenced blocks, their markers, their units.

Holds the parsing side of the docs-examples check: which fenced blocks of a Markdown
file run (``python``, ``ipython``, ``bash``/``sh``/``shell``, ``console``), which do not
(``text``, ``json`` and every other language), the ``<!-- example: ... -->`` markers that
say how a block runs, and how blocks group into units (one unit runs in one process in
one fresh directory). It must not run anything: ``docs_runner.py`` runs a unit, and
``test_docs_examples.py`` starts the fake server, the workspace and the runners.

Markers (an HTML comment on the last non-blank line before the fence; directives are
separated by commas):

- ``skip (reason)``: the block is not run; the reason is required.
- ``session NAME``: the blocks of one file with the same NAME run in one process, in
  document order, sharing variables, directory and servers.
- ``background``: a shell block that starts a server; it keeps running (its port, from
  ``--port N`` or ``HOST:N``, is waited on) until the unit ends.
- ``repl``: Python code a root model would write: it runs as a cell of a ``REPLEnv``
  whose ``context`` is the workspace's ``big.txt``.
- ``timeout N``: seconds the unit may take (default ``DEFAULT_TIMEOUT``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

RUN_LANGUAGES = {
    "python": "python",
    "py": "python",
    "ipython": "ipython",
    "bash": "shell",
    "sh": "shell",
    "shell": "shell",
    "console": "console",
}
# Blocks that are shown, never run: output, data, configuration.
SHOWN_LANGUAGES = frozenset({"text", "json", "jsonl", "toml", "yaml", "csv", "html"})
DEFAULT_TIMEOUT = 120.0

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*example:\s*(?P<body>.*?)\s*-->\s*$")
_SKIP = re.compile(r"^skip\s*\((?P<reason>.+)\)$")


class MarkerError(ValueError):
    """A marker the collector does not understand, or one on a block that cannot take it."""


@dataclass
class Block:
    """One fenced block: where it is, its language and text, and what its marker says."""

    path: str
    line: int  # the first line of the block's text (the line after the opening fence)
    language: str  # as written in the info string, lower case ("" when none)
    text: str
    skip: str | None = None
    session: str | None = None
    background: bool = False
    repl: bool = False
    timeout: float | None = None

    @property
    def kind(self) -> str | None:
        """How the block runs ("python", "ipython", "shell", "console"), None if shown only."""
        return RUN_LANGUAGES.get(self.language)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class Unit:
    """Blocks that run together in one process and one fresh directory."""

    blocks: list[Block] = field(default_factory=list)

    @property
    def id(self) -> str:
        first = self.blocks[0]
        name = f" [{first.session}]" if first.session else ""
        return f"{first.where}{name}"

    @property
    def timeout(self) -> float:
        given = [b.timeout for b in self.blocks if b.timeout is not None]
        return max(given) if given else DEFAULT_TIMEOUT


def _apply_marker(block: Block, body: str) -> None:
    for part in (p.strip() for p in body.split(",")):
        skip = _SKIP.match(part)
        if skip:
            block.skip = skip.group("reason").strip()
        elif part.startswith("session "):
            block.session = part.split(None, 1)[1].strip()
        elif part == "background":
            block.background = True
        elif part == "repl":
            block.repl = True
        elif part.startswith("timeout "):
            block.timeout = float(part.split(None, 1)[1])
        else:
            raise MarkerError(f"{block.where}: unknown example marker {part!r}")
    if block.background and block.kind != "shell":
        raise MarkerError(f"{block.where}: only a shell block can run in the background")
    if block.repl and block.kind != "python":
        raise MarkerError(f"{block.where}: only a python block can be REPL code")


def parse_blocks(text: str, path: str) -> list[Block]:
    """Every fenced block of a Markdown text, with its marker applied; ``path`` names the
    file in messages. Raises MarkerError for a marker it does not understand."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, info = opening.group("indent"), opening.group("fence"), opening.group("info")
        language = info.strip().split()[0].lower() if info.strip() else ""
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = lines[j].strip()
            if closing.startswith(fence[0] * len(fence)) and closing.strip(fence[0]) == "":
                break
            line = lines[j]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            j += 1
        block = Block(path=path, line=i + 2, language=language, text="\n".join(body) + "\n")
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = _MARKER.match(lines[k]) if k >= 0 else None
        if marker:
            _apply_marker(block, marker.group("body"))
        blocks.append(block)
        i = j + 1
    return blocks


def units_of(blocks: list[Block]) -> list[Unit]:
    """The runnable blocks grouped into units: a page's session's blocks together (placed
    where its first block is), every other block alone; skipped and shown-only blocks are
    left out."""
    units: list[Unit] = []
    sessions: dict[tuple[str, str], Unit] = {}
    for block in blocks:
        if block.kind is None or block.skip is not None:
            continue
        if block.session is None:
            units.append(Unit([block]))
            continue
        # A session belongs to its page: two pages may use the same name.
        unit = sessions.get((block.path, block.session))
        if unit is None:
            unit = sessions[(block.path, block.session)] = Unit()
            units.append(unit)
        unit.blocks.append(block)
    return units


def markdown_files(root: Path) -> list[Path]:
    """The Markdown files whose examples run: README.md and everything under docs/."""
    files = [root / "README.md"]
    files += sorted((root / "docs").rglob("*.md"))
    return [f for f in files if f.is_file()]


def console_commands(text: str) -> str:
    """The commands of a ``console`` block (lines after ``$ ``, with ``\\`` continuations),
    as a shell script; the other lines are output."""
    commands: list[str] = []
    continuing = False
    for line in text.splitlines():
        if continuing:
            commands.append(line)
        elif line.startswith("$ "):
            commands.append(line[2:])
        else:
            continue
        continuing = line.rstrip().endswith("\\")
    return "\n".join(commands) + "\n"
