"""Task inputs of a job: JSONL lines, the files of a directory, or CSV rows.

A job may hold thousands of large documents, so reading the inputs keeps only what
each task needs to start: its id, its query and where its context lives. A context is
read when its task starts (``Task.load_context``) and dropped when it ends:

- a JSONL line's inline ``"context"`` is re-read from the line's byte offset;
- ``"context_path"`` (JSONL or CSV) and ``--dir`` files are read from disk, decoded
  with the job's ``fmt``/``encoding`` exactly as ``rlm run`` reads ``--context``;
- a CSV ``context`` cell is kept in memory (CSV cells are small; use a
  ``context_path`` column for large documents).

Ids are unique per job (a duplicate is a ``TaskInputError``); ids from JSON may be
strings or integers and are written back as given. An input that holds no task at all
is a ``TaskInputError``. As ``rlm run`` refuses an empty ``--context`` file, a context
file that is empty (or only whitespace) fails its task unless the task has
``allow_empty``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlm.errors import TaskInputError

__all__ = ["Task", "load_context_file", "read_csv", "read_dir", "read_jsonl", "tasks_from"]

FORMATS = ("auto", "text", "json", "jsonl")

TaskId = str | int


@dataclass(frozen=True)
class Task:
    """One task of a job: ``id``, ``query`` and a way to get its context when it starts.

    Exactly one of ``context`` (the value itself), ``context_path`` (a file read with
    ``fmt``/``encoding``) or ``line_ref`` (``(jsonl_path, byte_offset)`` of a JSONL line
    holding ``"context"``) is used; with none of them the context is None.
    ``allow_empty`` lets an empty context file run (refused by default, as by ``rlm run``).
    """

    id: TaskId
    query: str
    context: Any = None
    context_path: str | None = None
    line_ref: tuple[str, int] | None = None
    fmt: str = "auto"
    encoding: str = "utf-8"
    allow_empty: bool = False

    @property
    def key(self) -> str:
        """The id as a str: what resume and duplicate checks compare."""
        return str(self.id)

    def load_context(self) -> Any:
        """Read this task's context now (from its file or JSONL line, or as given)."""
        if self.context_path is not None:
            return load_context_file(self.context_path, self.fmt, self.encoding, allow_empty=self.allow_empty)
        if self.line_ref is not None:
            path, offset = self.line_ref
            with open(path, "rb") as fh:
                fh.seek(offset)
                line = fh.readline()
            return json.loads(line).get("context")
        return self.context


def load_context_file(path: str | os.PathLike[str], fmt: str = "auto", encoding: str = "utf-8",
                      *, allow_empty: bool = False) -> Any:
    """Read a context file as ``rlm run --context`` does: text, JSON or JSONL by ``fmt``.

    ``fmt="auto"`` picks by extension (.json, .jsonl, otherwise text). Raises
    ``TaskInputError`` naming the file when it is missing, undecodable or malformed, or
    empty (only whitespace) unless ``allow_empty``.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError as exc:
        raise TaskInputError(f"context file not found: {path}") from exc
    except IsADirectoryError as exc:
        raise TaskInputError(f"context must be a file, not a directory: {path}") from exc
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise TaskInputError(
            f"{path} is not valid {encoding} text (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}); convert it to text first or pass --encoding (e.g. latin-1)"
        ) from exc
    del raw
    if not allow_empty and not text.strip():
        raise TaskInputError(
            f"{path} is empty: there is nothing to answer over (pass --allow-empty to run it anyway)"
        )
    if fmt == "auto":
        fmt = {".json": "json", ".jsonl": "jsonl"}.get(p.suffix.lower(), "text")
    try:
        if fmt == "json":
            return json.loads(text)
        if fmt == "jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise TaskInputError(f"{path} is not valid {fmt.upper()}: {exc}") from exc
    return text


def _check_id(value: Any, where: str) -> TaskId:
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise TaskInputError(f"{where}: 'id' must be a non-empty string or an integer, got {value!r}")
    return value


def _check_query(value: Any, default: str | None, where: str) -> str:
    query = default if value is None else value
    if not isinstance(query, str) or not query.strip():
        raise TaskInputError(
            f"{where}: no query; give each task a non-empty 'query' or pass --query for all"
        )
    return query


def _resolve(base: Path, path: Any, where: str) -> str:
    if not isinstance(path, str) or not path:
        raise TaskInputError(f"{where}: 'context_path' must be a non-empty string")
    p = Path(path)
    # Relative paths are relative to the tasks file, so a job directory can move.
    return str(p if p.is_absolute() else base / p)


def read_jsonl(
    path: str | os.PathLike[str], *, query: str | None = None, fmt: str = "auto",
    encoding: str = "utf-8",
) -> list[Task]:
    """Tasks from a JSONL file of ``{"id", "query", "context" | "context_path"}`` lines.

    ``query`` is the default for lines without one. Inline contexts are not kept: each
    task remembers its line's offset and re-reads it when it starts. Blank lines are
    skipped; a malformed line is a ``TaskInputError`` naming its line number.
    """
    source = Path(path)
    if not source.is_file():
        raise TaskInputError(f"tasks file not found: {path}")
    base = source.resolve().parent
    tasks: list[Task] = []
    offset = 0
    with source.open("rb") as fh:
        for number, line in enumerate(fh, 1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                item = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise TaskInputError(f"{where} is not valid JSON: {exc}") from exc
            if not isinstance(item, dict):
                raise TaskInputError(f"{where}: each line must be a JSON object with 'id' and 'query'")
            task_id = _check_id(item.get("id"), where)
            task_query = _check_query(item.get("query"), query, where)
            if "context_path" in item and "context" in item:
                raise TaskInputError(f"{where}: give 'context' or 'context_path', not both")
            if "context_path" in item:
                tasks.append(Task(task_id, task_query, context_path=_resolve(base, item["context_path"], where),
                                  fmt=fmt, encoding=encoding))
            elif "context" in item:
                tasks.append(Task(task_id, task_query, line_ref=(str(source.resolve()), start)))
            else:
                tasks.append(Task(task_id, task_query))
            del item
    if not tasks:
        raise TaskInputError(f"{path} holds no tasks: give one JSON object per line, with 'id', "
                             "'query' and 'context' or 'context_path'")
    return check_unique(tasks, str(path))


def read_dir(
    directory: str | os.PathLike[str], query: str, *, fmt: str = "auto", encoding: str = "utf-8",
) -> list[Task]:
    """One task per file under ``directory`` (recursively, hidden files skipped), in
    sorted order; the id is the file's path relative to ``directory`` (with ``/``)."""
    root = Path(directory)
    if not root.is_dir():
        raise TaskInputError(f"{directory} is a file, not a directory" if root.exists()
                             else f"directory not found: {directory}")
    task_query = _check_query(None, query, f"--dir {directory}")
    tasks = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        tasks.append(Task(rel.as_posix(), task_query, context_path=str(p), fmt=fmt, encoding=encoding))
    if not tasks:
        raise TaskInputError(f"{directory} holds no files to process")
    return tasks


def read_csv(
    path: str | os.PathLike[str], *, query: str | None = None, fmt: str = "auto",
    encoding: str = "utf-8",
) -> list[Task]:
    """Tasks from a CSV file whose header names the columns: ``id`` (required),
    ``query`` (or ``query=`` for all), and ``context`` or ``context_path``."""
    source = Path(path)
    if not source.is_file():
        raise TaskInputError(f"tasks file not found: {path}")
    base = source.resolve().parent
    tasks = []
    with source.open(newline="", encoding=encoding) as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or [])
        if "id" not in columns:
            raise TaskInputError(
                f"{path}: the CSV header must name an 'id' column (and 'query', 'context' or "
                f"'context_path'); found {sorted(columns)}"
            )
        for row in reader:
            where = f"{path} line {reader.line_num}"
            task_id = _check_id(row.get("id"), where)
            task_query = _check_query(row.get("query") or None, query, where)
            if row.get("context_path"):
                tasks.append(Task(task_id, task_query, context_path=_resolve(base, row["context_path"], where),
                                  fmt=fmt, encoding=encoding))
            else:
                tasks.append(Task(task_id, task_query, context=row.get("context")))
    if not tasks:
        raise TaskInputError(f"{path} holds no tasks: its header is followed by no rows")
    return check_unique(tasks, str(path))


def tasks_from(
    items: Iterable[Task | Mapping[str, Any]], *, query: str | None = None, fmt: str = "auto",
    encoding: str = "utf-8",
) -> list[Task]:
    """Tasks from Python objects: ``Task`` instances or mappings with the JSONL keys."""
    tasks = []
    for n, item in enumerate(items):
        if isinstance(item, Task):
            tasks.append(item)
            continue
        if not isinstance(item, Mapping):
            raise TaskInputError(f"task {n} must be a Task or a mapping with 'id' and 'query'")
        where = f"task {n}"
        task_id = _check_id(item.get("id"), where)
        task_query = _check_query(item.get("query"), query, where)
        if item.get("context_path") is not None:
            tasks.append(Task(task_id, task_query, context_path=str(item["context_path"]), fmt=fmt,
                              encoding=encoding))
        else:
            tasks.append(Task(task_id, task_query, context=item.get("context")))
    return check_unique(tasks, "the tasks")


def check_unique(tasks: list[Task], source: str) -> list[Task]:
    """Return ``tasks`` if every id is unique; a ``TaskInputError`` naming a repeat if not."""
    seen: set[str] = set()
    for task in tasks:
        if task.key in seen:
            raise TaskInputError(
                f"duplicate task id {task.id!r} in {source}: ids must be unique, since the "
                "output and resume are keyed by id"
            )
        seen.add(task.key)
    return tasks
