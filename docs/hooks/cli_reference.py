"""MkDocs hook: the command-line reference, generated from the ``rlm`` argument parser.

``reference/cli.md`` holds the marker ``<!-- cli-reference -->``; at build time it is
replaced by one section per command and sub-command (its description, usage line and a
table of every argument with its help text, defaults included), read from
``rlm.cli.build_parser()``, so the page cannot drift from the command. It must not hold
anything but that rendering.
"""

from __future__ import annotations

import argparse
import html
import os
from collections.abc import Iterator
from typing import Any

MARKER = "<!-- cli-reference -->"
PAGE = "reference/cli.md"
_WIDTH = "74"


def _text(value: str) -> str:
    """Help text as inert Markdown inside a table cell."""
    escaped = html.escape(" ".join(value.split()), quote=False)
    for char, entity in (("|", "&#124;"), ("*", "&#42;"), ("_", "&#95;"), ("`", "&#96;"),
                         ("[", "&#91;"), ("]", "&#93;")):
        escaped = escaped.replace(char, entity)
    return escaped


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def walk(parser: argparse.ArgumentParser, name: str = "rlm"
         ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every command and sub-command under ``parser``, as ("rlm bench run", its parser)."""
    for sub_name, sub in _subcommands(parser).items():
        full = f"{name} {sub_name}"
        yield full, sub
        yield from walk(sub, full)


def arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The arguments of one parser that its help shows (not help, not hidden ones)."""
    return [a for a in parser._actions
            if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)
            and not isinstance(a, argparse._SubParsersAction)]


def _argument_cell(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    names = ", ".join(f"`{o}`" for o in action.option_strings)
    if action.nargs == 0:
        return names
    if action.choices is not None and action.metavar is None:
        return f"{names} `{{{','.join(map(str, action.choices))}}}`"
    metavar = action.metavar or action.dest.upper()
    return f"{names} `{metavar}`"


def _usage(parser: argparse.ArgumentParser) -> str:
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = _WIDTH  # usage lines wrap the same on every machine
    try:
        return parser.format_usage().strip()
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous


def _section(title: str, parser: argparse.ArgumentParser, level: int) -> str:
    out = [f"{'#' * level} `{title}`", ""]
    if parser.description:
        out += [_text(parser.description), ""]
    out += ["```text", _usage(parser), "```", ""]
    rows = arguments(parser)
    if rows:
        out += ["| argument | what it does |", "|---|---|"]
        for action in rows:
            required = " (required)" if action.required and action.option_strings else ""
            out.append(f"| {_argument_cell(action)} | {_text(action.help or '')}{required} |")
        out.append("")
    if parser.epilog:
        out += [_text(parser.epilog), ""]
    return "\n".join(out)


def cli_markdown(parser: argparse.ArgumentParser | None = None) -> str:
    """The whole reference as Markdown: the top-level command, then each command."""
    if parser is None:
        from rlm.cli import build_parser

        parser = build_parser()
    parts = [_section("rlm", parser, 2)]
    for title, sub in walk(parser):
        parts.append(_section(title, sub, 2 + title.count(" ")))
    return "\n".join(parts)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Put the generated reference where ``reference/cli.md`` has the marker."""
    if page.file.src_uri == PAGE:
        if MARKER not in markdown:
            raise ValueError(f"{PAGE} lost its {MARKER} marker")
        return markdown.replace(MARKER, cli_markdown())
    return markdown
