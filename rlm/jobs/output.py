"""The job's output: a JSONL file that is always valid up to its last finished task.

One line per finished task, appended by one writer thread and fsynced as soon as the
line is written: a task counts as done only once its line is on disk, so a crash (even
SIGKILL) loses at most the tasks still running, never a finished one. Lines are in
completion order; ``rewrite_sorted`` puts them in input order at the end.

Resuming reads the file back: every complete line is a finished task; a torn last line
(the process died mid-write) is cut off, because its task did not finish. A line other
than the last that is not JSON means the file was edited or is not ours: resuming
refuses instead of guessing.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rlm.errors import OutputFileError
from rlm.usage import COST_DECIMALS

__all__ = [
    "ResultsWriter",
    "drop_ids",
    "error_record",
    "is_failed",
    "read_results",
    "result_record",
    "rewrite_sorted",
]


def result_record(task_id: Any, result: Any) -> dict[str, Any]:
    """The output line of a finished task, from its ``RLMResult``.

    Keys: ``id``, ``answer``, ``output`` (only for typed runs), ``stopped_reason``,
    ``error``, ``iterations``, ``sub_calls``, ``usage`` (``root`` and ``sub``),
    ``cost_usd``, ``tokens``, ``elapsed_s`` and ``log_path``.
    """
    data = result.to_dict()
    total = result.total_usage
    record: dict[str, Any] = {"id": task_id, "answer": data["answer"]}
    if "output" in data:
        record["output"] = data["output"]
    record.update(
        stopped_reason=data["stopped_reason"],
        error=data["error"],
        iterations=data["iterations"],
        sub_calls=data["sub_calls"],
        usage=data["usage"],
        cost_usd=total.cost_usd,
        tokens=total.total_tokens,
        elapsed_s=data["elapsed_s"],
        log_path=data["log_path"],
    )
    return record


def error_record(task_id: Any, error: str, elapsed_s: float = 0.0) -> dict[str, Any]:
    """The output line of a task that could not run at all (its context failed to load)."""
    return {
        "id": task_id, "answer": None, "stopped_reason": "error", "error": error,
        "iterations": 0, "sub_calls": 0, "usage": None, "cost_usd": 0.0, "tokens": 0,
        "elapsed_s": round(elapsed_s, 3), "log_path": None,
    }


def is_failed(record: dict[str, Any]) -> bool:
    """True when a finished task ended without an answer (its ``error`` says why)."""
    return record.get("answer") is None and record.get("output") is None


def read_results(path: str | os.PathLike[str], *, repair: bool = True) -> dict[str, dict[str, Any]]:
    """The records already in ``path``, by id as str (empty if there is no file).

    A torn last line is dropped, and with ``repair`` also cut from the file so the next
    append starts on a fresh line. Raises ``OutputFileError`` for a bad line elsewhere.
    """
    p = Path(path)
    if not p.exists():
        return {}
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise _unusable(p, exc) from None
    records: dict[str, dict[str, Any]] = {}
    lines = data.split(b"\n")  # the piece after the last newline is b"" or a torn line
    numbered = [(n, raw) for n, raw in enumerate(lines, 1) if raw.strip()]
    good_end = 0
    offset = 0
    for number, raw in enumerate(lines, 1):
        end = offset + len(raw) + 1
        if raw.strip():
            record = _parse(raw) if end <= len(data) else None
            if record is None:
                if numbered[-1][0] != number:
                    raise OutputFileError(
                        f"line {number} of {path} is not a JSON record: the file was edited or "
                        "is not a job output; fix or remove that line, or pick another --out"
                    )
                break  # the last line is torn: its writer died mid-line
            records[str(record["id"])] = record
        good_end = min(end, len(data))
        offset = end
    if repair and good_end < len(data):
        with p.open("r+b") as fh:
            fh.truncate(good_end)
            fh.flush()
            os.fsync(fh.fileno())
    return records


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or "id" not in record:
        return None
    return record


def drop_ids(path: str | os.PathLike[str], ids: set[str]) -> None:
    """Rewrite ``path`` without the records of ``ids`` (atomically: a crash keeps either
    the old file or the new one). Used before re-running failed tasks."""
    p = Path(path)
    keep = [r for key, r in read_results(p).items() if key not in ids]
    _replace(p, keep)


def rewrite_sorted(path: str | os.PathLike[str], order: Iterable[str]) -> None:
    """Rewrite ``path`` with its records in ``order`` (ids as str); records whose id is not
    in ``order`` keep their place after them. Atomic, like ``drop_ids``."""
    p = Path(path)
    records = read_results(p)
    ranked = [records.pop(key) for key in order if key in records]
    _replace(p, ranked + list(records.values()))


def _replace(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(_json_line(record).decode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _json_line(record: dict[str, Any]) -> bytes:
    # The cost as written is rounded; the record itself keeps the exact sum, which the
    # job's budget charges.
    cost = record.get("cost_usd")
    if isinstance(cost, float):
        record = {**record, "cost_usd": round(cost, COST_DECIMALS)}
    return json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"


def _unusable(path: Path, exc: OSError) -> OutputFileError:
    """The one-line error for an output path that cannot be read or created."""
    if path.is_dir():
        return OutputFileError(f"the output {path} is a directory; give a file name (e.g. {path}/results.jsonl)")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            return OutputFileError(f"the output {path} cannot be created: {parent} is a file, not a directory")
    reason = exc.strerror or str(exc)
    return OutputFileError(f"the output {path} cannot be written ({reason}); give a file in a writable directory")


_STOP = object()


class ResultsWriter:
    """Appends records to the output from one thread, each fsynced before it counts.

    ``write(record)`` queues a line and returns at once (the event loop never waits on
    the disk); the thread writes what is queued, flushes and fsyncs, then calls
    ``on_durable(record)`` for each. Many lines finishing together share one fsync.
    ``close()`` writes everything queued, then stops the thread.
    """

    def __init__(self, path: str | os.PathLike[str], on_durable: Any = None) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("ab")
        except OSError as exc:
            raise _unusable(self.path, exc) from None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._on_durable = on_durable
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="rlm-job-writer", daemon=True)
        self._thread.start()

    def write(self, record: dict[str, Any]) -> None:
        """Queue one record (a JSON object with ``id``) to be appended."""
        if self.error is not None:
            raise OutputFileError(f"cannot write {self.path}: {self.error}")
        self._queue.put(record)

    def _serve(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            records = []
            for item in batch:
                if item is _STOP:
                    stop = True
                else:
                    records.append(item)
            if not records:
                continue
            try:
                data = b"".join(_json_line(r) for r in records)
                self._fh.write(data)
                self._fh.flush()
                os.fsync(self._fh.fileno())
            except BaseException as exc:  # noqa: BLE001 - reported to the job by write()
                self.error = exc
                return
            if self._on_durable is not None:
                for record in records:
                    self._on_durable(record)

    def close(self) -> None:
        """Write everything queued, fsync, stop the thread and close the file."""
        self._queue.put(_STOP)
        self._thread.join()
        self._fh.close()
