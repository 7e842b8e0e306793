"""The sub-query cache: a reply store shared between processes, and single-flight.

Two layers, one concept (never ask the model the same thing twice):

- ``Cache`` is a store of replies by request key. ``SQLiteCache``, the default, is one
  SQLite file in WAL mode, so two notebooks or a job's workers can read and write one
  directory at once; it has a size limit (least recently used entries go first) and
  an optional TTL, and it records hits for ``rlm cache info``. Its replies quote the
  documents they were asked about, so the directory it creates is private to its user
  (0700) and the database, with its WAL and shared-memory files, is 0600.
- ``RequestCache`` is what a client holds on the engine loop. It joins identical
  requests that are in flight at the same moment (single-flight, with or without a
  store), looks a batch up in the store with a handful of ``IN (...)`` queries, and
  writes new replies back in batches. Every store call runs on one dedicated thread,
  so the engine loop never waits on the disk.

The key is a SHA-256 of the canonical request: the base URL plus the JSON body with
sorted keys (model, messages and every sampling or format parameter), so any change
that can change the answer is a different key. A cached reply is returned whatever
the temperature: pass ``cache=False`` for a call that wants a fresh sample.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import queue
import sqlite3
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from rlm import loop as engine
from rlm.errors import ConfigError

T = TypeVar("T")
R = TypeVar("R", bound="ReplyLike")

log = logging.getLogger("rlm.cache")

KEY_VERSION = "rlm-cache-1"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MAX_BYTES = 1 << 30
DB_NAME = "cache.sqlite3"
# Body fields that never change the reply: how it is delivered and who asked.
_NOT_IN_KEY = frozenset({"stream", "stream_options", "user", "metadata", "store"})
# Bound variables per statement; SQLite builds before 3.32 allow at most 999.
_CHUNK = 900
# After an eviction the store is this fraction of its limit, so the next few writes do
# not each pay for another eviction pass.
_LOW_WATER = 0.9

class ReplyLike(Protocol):
    """What the cache stores of a reply (the client's own reply type has these too)."""

    @property
    def text(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...


@dataclass(frozen=True, slots=True)
class CachedReply:
    """One stored reply: its text, the model that answered, and the tokens it cost (of
    the prompt tokens, those the provider's prompt cache served and those written to it;
    of the completion tokens, those spent reasoning), so a replay is priced as the
    original was."""

    text: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_input_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(frozen=True)
class CacheInfo:
    """What ``rlm cache info`` prints: where, how many entries, their bytes, hits so far."""

    path: str
    entries: int
    bytes: int
    hits: int
    max_bytes: int | None = None
    ttl_s: float | None = None
    file_bytes: int = 0

    def summary(self) -> str:
        """Readable lines for ``rlm cache info``."""
        lines = [
            f"cache:    {self.path}",
            f"entries:  {self.entries:,}",
            f"size:     {_human_bytes(self.bytes)} of replies, {_human_bytes(self.file_bytes)} on disk",
            f"hits:     {self.hits:,}",
        ]
        if self.max_bytes is not None:
            lines.append(f"limit:    {_human_bytes(self.max_bytes)} (least recently used go first)")
        if self.ttl_s is not None:
            lines.append(f"ttl:      {self.ttl_s:g} s")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return {
            "path": self.path, "entries": self.entries, "bytes": self.bytes,
            "hits": self.hits, "max_bytes": self.max_bytes, "ttl_s": self.ttl_s,
            "file_bytes": self.file_bytes,
        }  # fmt: skip


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def request_key(base_url: str | None, body: Mapping[str, Any]) -> str | None:
    """The stable cache key of one chat request, or None when it cannot be cached.

    A SHA-256 over a canonical encoding of the request: the endpoint (``base_url``,
    trailing slash ignored), every body field as JSON with sorted keys except the ones
    that only say how the reply is delivered (``stream``...), then each message: its
    role and its text length-prefixed (other message shapes as sorted JSON). Message
    text is hashed as UTF-8 rather than JSON-escaped: escaping a 500 KB chunk costs as
    much as sending it, hashing it a tenth of that. A body that is not plain JSON data
    gives None: such a request is sent every time, never guessed at.
    """
    return _KeyMaker(base_url).key(body)


class _KeyMaker:
    """``request_key`` for many bodies to one endpoint: the bodies of a batch share
    their parameters, so those are encoded once, not once per item."""

    def __init__(self, base_url: str | None) -> None:
        where = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self._prefix = hashlib.sha256(f"{KEY_VERSION}\n{where}\n".encode())
        self._last_rest: dict[str, Any] | None = None
        self._last_prefix = self._prefix

    def key(self, body: Mapping[str, Any]) -> str | None:
        try:
            rest = {k: v for k, v in body.items() if k != "messages" and k not in _NOT_IN_KEY}
            if rest != self._last_rest:
                head = self._prefix.copy()
                head.update(_canonical(rest))
                self._last_rest, self._last_prefix = rest, head
            digest = self._last_prefix.copy()
            messages = body.get("messages")
            if messages is not None:
                if not isinstance(messages, list | tuple):
                    return None
                digest.update(b"\0messages")
                for message in messages:
                    content = message.get("content")
                    role = message.get("role")
                    # JSON never holds a raw NUL and the text is length-prefixed, so no
                    # two different requests encode the same.
                    if type(content) is str and type(role) is str and len(message) == 2:
                        text = content.encode("utf-8", "surrogatepass")
                        digest.update(b"\0R%s\0%d\0" % (role.encode("utf-8", "surrogatepass"),
                                                         len(text)))
                        digest.update(text)
                    else:
                        digest.update(b"\0J" + _canonical(message))
        except (TypeError, ValueError, AttributeError):
            return None
        return digest.hexdigest()


def _make_private(db: Path) -> None:
    """Create the database file 0600 before SQLite does (it would make it 0644, and its
    WAL and shared-memory files take the database's mode), and narrow the files of a
    database this user made earlier with the wider mode."""
    os.close(os.open(db, os.O_RDWR | os.O_CREAT, 0o600))
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        with contextlib.suppress(FileNotFoundError, PermissionError):
            info = path.stat()
            if info.st_uid == os.getuid() and info.st_mode & 0o077:
                path.chmod(info.st_mode & 0o700)


def _set_wal(conn: sqlite3.Connection, patience_s: float) -> None:
    """Put the database in WAL mode, waiting out another process doing the same.

    Changing the journal mode needs the database to itself, and SQLite reports "database
    is locked" for it at once rather than through the busy handler, so two processes
    opening a new cache together could fail: retry until ``patience_s`` has passed.
    """
    deadline = time.monotonic() + patience_s
    pause = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False)
# Batches whose message texts add up to less than this are keyed on the engine loop.
_INLINE_KEY_CHARS = 64 * 1024


def _text_size(bodies: Sequence[Mapping[str, Any]]) -> int:
    """About how many characters keying ``bodies`` hashes (stops counting past the cap)."""
    total = 0
    for body in bodies:
        messages = body.get("messages")
        if not isinstance(messages, list | tuple):
            return _INLINE_KEY_CHARS + 1
        for message in messages:
            content = message.get("content") if isinstance(message, Mapping) else None
            total += len(content) if isinstance(content, str) else 4096
        if total > _INLINE_KEY_CHARS:
            break
    return total


def _canonical(value: Any) -> bytes:
    return _ENCODER.encode(value).encode()


def default_cache_dir() -> Path:
    """The per-user cache directory: RLM_CACHE_DIR, else the platform's convention.

    Linux and other Unixes: ``$XDG_CACHE_HOME/rlm`` (``~/.cache/rlm``); macOS:
    ``~/Library/Caches/rlm``; Windows: ``%LOCALAPPDATA%\\rlm\\Cache``. Written by hand
    rather than with platformdirs: these three rules are the whole job.
    """
    override = os.environ.get("RLM_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "rlm" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "rlm"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "rlm"


class Cache(abc.ABC):
    """A store of chat replies by request key; subclass it for a custom store.

    The methods are plain blocking calls: a client runs them on its cache thread, one
    at a time, never on the engine loop. ``get_many`` returns the entries it has (a
    missing or expired key is simply absent); ``put_many`` stores or replaces entries.
    A store shared between processes must make both safe for concurrent use.
    """

    @abc.abstractmethod
    def get_many(self, keys: Sequence[str]) -> dict[str, CachedReply]:
        """The stored replies for those of ``keys`` that are present."""

    @abc.abstractmethod
    def put_many(self, entries: Mapping[str, ReplyLike]) -> None:
        """Store (or replace) each entry."""

    def info(self) -> CacheInfo:
        """Entries, bytes and hits; stores that do not count them report zeros."""
        return CacheInfo(path=repr(self), entries=0, bytes=0, hits=0)

    def clear(self) -> None:  # noqa: B027 - optional for custom stores
        """Remove every entry."""

    def close(self) -> None:  # noqa: B027 - optional for custom stores
        """Release files and connections; the store is not used afterwards."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    size INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL DEFAULT 0,
    cache_creation_tokens INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    accessed REAL NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS entries_accessed ON entries (accessed);
CREATE INDEX IF NOT EXISTS entries_created ON entries (created);
CREATE TABLE IF NOT EXISTS totals (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO totals VALUES ('bytes', 0), ('hits', 0);
CREATE TRIGGER IF NOT EXISTS entries_added AFTER INSERT ON entries BEGIN
    UPDATE totals SET value = value + NEW.size WHERE name = 'bytes';
END;
CREATE TRIGGER IF NOT EXISTS entries_removed AFTER DELETE ON entries BEGIN
    UPDATE totals SET value = value - OLD.size WHERE name = 'bytes';
END;
CREATE TRIGGER IF NOT EXISTS entries_resized AFTER UPDATE OF size ON entries BEGIN
    UPDATE totals SET value = value + NEW.size - OLD.size WHERE name = 'bytes';
END;
"""

# A reply's token counts beyond prompt and completion, stored since the cache priced
# prompt caching; a store made before then gains them (as 0) when first opened.
_TOKEN_DETAILS = ("cached_input_tokens", "cache_creation_tokens", "reasoning_tokens")


def _add_token_details(conn: sqlite3.Connection) -> None:
    """Add the token-detail columns to a store made without them (inside the schema's
    transaction, so two processes opening it at once add them once)."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(entries)")}
    for name in _TOKEN_DETAILS:
        if name not in have:
            conn.execute(f"ALTER TABLE entries ADD COLUMN {name} INTEGER NOT NULL DEFAULT 0")


# Fixed per-entry bytes beyond the text (key, model name, numbers, b-tree overhead).
_ENTRY_OVERHEAD = 160


class SQLiteCache(Cache):
    """The default store: ``DIR/cache.sqlite3``, SQLite in WAL mode, safe across processes.

    ``max_bytes`` bounds the stored reply bytes: past it, the least recently used
    entries are evicted down to 90% of the limit. ``ttl`` (seconds) makes older
    entries misses, and they are purged on the next write. Writers wait for each
    other (``busy_timeout``) instead of failing, and each write is one transaction,
    so readers in other processes see all of a batch or none of it. Not for network
    file systems (SQLite's WAL needs shared memory on one host).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        ttl: float | None = None,
        busy_timeout: float = 30.0,
    ) -> None:
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise ConfigError(f"max_bytes must be a positive int, got {max_bytes!r}")
        if ttl is not None and not ttl > 0:
            raise ConfigError(f"ttl must be a positive number of seconds or None, got {ttl!r}")
        self.directory = Path(directory).expanduser()
        if self.directory.exists() and not self.directory.is_dir():
            raise ConfigError(
                f"cache path {str(self.directory)!r} is a file; pass a directory (it holds "
                f"{DB_NAME})"
            )
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the cache directory {str(self.directory)!r}: {exc}; pass "
                "another path, or cache=False"
            ) from exc
        self.path = self.directory / DB_NAME
        self.max_bytes = max_bytes
        self.ttl = float(ttl) if ttl is not None else None
        self._busy_ms = int(busy_timeout * 1000)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        # Hits are counted in memory and written with the next write, info() or
        # close(): a fully cached batch then costs reads only, never the write lock.
        self._touched: dict[str, int] = {}
        self._touched_at = 0.0

    def __repr__(self) -> str:
        return f"SQLiteCache({str(self.directory)!r})"

    # -- Cache --------------------------------------------------------------------

    def get_many(self, keys: Sequence[str]) -> dict[str, CachedReply]:
        """One ``SELECT ... WHERE key IN (...)`` per 900 keys; expired entries are absent."""
        found: dict[str, CachedReply] = {}
        if not keys:
            return found
        now = time.time()
        # Expired entries stay on disk until the next write purges them; here they miss.
        fresh = f" AND created >= {now - self.ttl!r}" if self.ttl is not None else ""
        with self._lock:
            conn = self._connect()
            for start in range(0, len(keys), _CHUNK):
                chunk = keys[start:start + _CHUNK]
                rows = conn.execute(
                    "SELECT key, text, model, prompt_tokens, completion_tokens, "
                    "cached_input_tokens, cache_creation_tokens, reasoning_tokens FROM entries "
                    f"WHERE key IN ({','.join('?' * len(chunk))}){fresh}",
                    chunk,
                )
                for key, text, model, pt, ct, read, written, reasoning in rows:
                    found[key] = CachedReply(text, model, pt, ct, read, written, reasoning)
            touched = self._touched
            for key in found:
                touched[key] = touched.get(key, 0) + 1
            self._touched_at = now
        return found

    def put_many(self, entries: Mapping[str, ReplyLike]) -> None:
        """Upsert every entry in one transaction, then purge expired and evict LRU."""
        if not entries:
            return
        now = time.time()
        rows = [
            (key, r.text, r.model, int(r.prompt_tokens), int(r.completion_tokens),
             len(r.text.encode()) + len(r.model) + _ENTRY_OVERHEAD, now, now,
             *(int(getattr(r, name, 0) or 0) for name in _TOKEN_DETAILS))
            for key, r in entries.items()
        ]  # fmt: skip
        with self._lock:
            conn = self._connect()
            with _transaction(conn):
                self._apply_touches(conn)
                conn.executemany(
                    "INSERT INTO entries (key, text, model, prompt_tokens, completion_tokens,"
                    " size, created, accessed, cached_input_tokens, cache_creation_tokens,"
                    " reasoning_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET text = excluded.text,"
                    " model = excluded.model, prompt_tokens = excluded.prompt_tokens,"
                    " completion_tokens = excluded.completion_tokens, size = excluded.size,"
                    " created = excluded.created, accessed = excluded.accessed,"
                    " cached_input_tokens = excluded.cached_input_tokens,"
                    " cache_creation_tokens = excluded.cache_creation_tokens,"
                    " reasoning_tokens = excluded.reasoning_tokens",
                    rows,
                )
                if self.ttl is not None:
                    conn.execute("DELETE FROM entries WHERE created < ?", (now - self.ttl,))
                self._evict(conn)

    def info(self) -> CacheInfo:
        """Entries, reply bytes, hits recorded (by every process) and bytes on disk."""
        with self._lock:
            conn = self._connect()
            if self._touched:
                with _transaction(conn):
                    self._apply_touches(conn)
            entries = conn.execute("SELECT count(*) FROM entries").fetchone()[0]
            totals = dict(conn.execute("SELECT name, value FROM totals").fetchall())
        return CacheInfo(
            path=str(self.directory),
            entries=int(entries),
            bytes=int(totals.get("bytes", 0)),
            hits=int(totals.get("hits", 0)),
            max_bytes=self.max_bytes,
            ttl_s=self.ttl,
            file_bytes=_files_size(self.path),
        )

    def clear(self) -> None:
        """Delete every entry and the hit count, then give the space back to the disk."""
        with self._lock:
            conn = self._connect()
            self._touched.clear()
            with _transaction(conn):
                conn.execute("DELETE FROM entries")
                conn.execute("UPDATE totals SET value = 0")
            try:
                conn.execute("VACUUM")
            except sqlite3.OperationalError:
                pass  # another process holds a read: the pages are reused anyway

    def close(self) -> None:
        """Write pending hit counts and close the connection (reopened if used again)."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            try:
                if self._touched:
                    with _transaction(conn):
                        self._apply_touches(conn)
            finally:
                conn.close()

    # -- internals ----------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        _make_private(self.path)
        # Autocommit mode: transactions are explicit BEGIN IMMEDIATE, so a writer takes
        # the lock up front and waits for it, instead of failing on a lock upgrade.
        conn = sqlite3.connect(
            self.path, timeout=self._busy_ms / 1000, isolation_level=None,
            check_same_thread=False,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
            _set_wal(conn, self._busy_ms / 1000)
            conn.execute("PRAGMA synchronous = NORMAL")
            with _transaction(conn):
                for statement in _statements(_SCHEMA):
                    conn.execute(statement)
                _add_token_details(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _apply_touches(self, conn: sqlite3.Connection) -> None:
        touched, self._touched = self._touched, {}
        if not touched:
            return
        # Every key read since the last write gets the latest read's time: close enough
        # for LRU, and no per-key clock reading on the read path.
        when = self._touched_at
        conn.executemany(
            "UPDATE entries SET accessed = max(accessed, ?), hits = hits + ? WHERE key = ?",
            [(when, count, key) for key, count in touched.items()],
        )
        conn.execute(
            "UPDATE totals SET value = value + ? WHERE name = 'hits'", (sum(touched.values()),)
        )

    def _evict(self, conn: sqlite3.Connection) -> None:
        total = conn.execute("SELECT value FROM totals WHERE name = 'bytes'").fetchone()[0]
        if total <= self.max_bytes:
            return
        excess = total - int(self.max_bytes * _LOW_WATER)
        victims: list[str] = []
        freed = 0
        for key, size in conn.execute("SELECT key, size FROM entries ORDER BY accessed, rowid"):
            victims.append(key)
            freed += size
            if freed >= excess:
                break
        for start in range(0, len(victims), _CHUNK):
            chunk = victims[start:start + _CHUNK]
            conn.execute(f"DELETE FROM entries WHERE key IN ({','.join('?' * len(chunk))})", chunk)


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction that takes the write lock up front (waiting busy_timeout)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _statements(script: str) -> list[str]:
    """Split the schema into statements (triggers hold ';' inside BEGIN ... END)."""
    out: list[str] = []
    current = ""
    for line in script.strip().splitlines():
        current += line + "\n"
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    return out


def _files_size(db: Path) -> int:
    total = 0
    for suffix in ("", "-wal", "-shm"):
        try:
            total += os.path.getsize(f"{db}{suffix}")
        except OSError:
            pass
    return total


def cache_info(directory: str | os.PathLike[str] | None = None) -> CacheInfo:
    """``rlm cache info``: the store in ``directory`` (default: the per-user one).

    A directory that holds no cache yet reports zero entries and is not created.
    """
    where = Path(directory).expanduser() if directory is not None else default_cache_dir()
    if not (where / DB_NAME).exists():
        return CacheInfo(path=str(where), entries=0, bytes=0, hits=0)
    store = SQLiteCache(where)
    try:
        return store.info()
    finally:
        store.close()


def clear_cache(directory: str | os.PathLike[str] | None = None) -> CacheInfo:
    """``rlm cache clear``: empty the store in ``directory``; returns what it held."""
    where = Path(directory).expanduser() if directory is not None else default_cache_dir()
    if not (where / DB_NAME).exists():
        return CacheInfo(path=str(where), entries=0, bytes=0, hits=0)
    store = SQLiteCache(where)
    try:
        before = store.info()
        store.clear()
        return before
    finally:
        store.close()


def parse_cache_option(text: str) -> bool | str:
    """A ``cache=`` value typed by a person (a magic line): on/true/yes is True (the
    per-user directory), off/false/no/none is False, anything else a directory."""
    word = text.strip()
    if word.lower() in ("on", "true", "yes", "1"):
        return True
    if word.lower() in ("off", "false", "no", "none", "0", ""):
        return False
    return word


def open_cache(spec: Any) -> Cache | None:
    """Turn a ``cache=`` argument into a store: None/False off, True the per-user
    directory, a path that directory, a ``Cache`` object itself; anything else is a
    ``ConfigError``."""
    if spec is None or spec is False:
        return None
    if spec is True:
        return SQLiteCache(default_cache_dir())
    if isinstance(spec, Cache):
        return spec
    if isinstance(spec, str | os.PathLike):
        return SQLiteCache(spec)
    raise ConfigError(
        f"cache must be None/False (off), True (the per-user cache directory), a "
        f"directory path or an rlm.cache.Cache object, not {type(spec).__name__}"
    )


class _StoreThread:
    """One daemon thread that runs every store call in order, off the engine loop.

    Started on demand and gone after a minute idle, so a client nobody closes leaves
    no thread behind. Not a ThreadPoolExecutor: that refuses work once the interpreter
    starts shutting down, and the last replies of a script are written from the exit
    hook.
    """

    IDLE_S = 60.0

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            self._queue.put((future, fn, args))
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="rlm-cache", daemon=True)
                self._thread.start()
        return future

    def stop(self, timeout: float | None = None) -> None:
        with self._lock:
            thread = self._thread
            if thread is None:
                return
            self._queue.put(None)
        thread.join(timeout)

    def _serve(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self.IDLE_S)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            if item is None:
                with self._lock:
                    self._thread = None
                return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                future.set_exception(exc)


def _keys_and_hits(
    store: Cache | None, base_url: str | None, bodies: Sequence[Mapping[str, Any]]
) -> tuple[list[str | None], dict[str, CachedReply], BaseException | None]:
    """Run on the cache thread: keys for ``bodies``, then one store lookup for them all."""
    make = _KeyMaker(base_url).key
    keys = [make(b) for b in bodies]
    if store is None:
        return keys, {}, None
    wanted = list(dict.fromkeys(k for k in keys if k is not None))
    try:
        return keys, store.get_many(wanted), None
    except Exception as exc:  # noqa: BLE001 - a broken store is a miss, said once
        return keys, {}, exc


class _LeaderGone(Exception):
    """The call that was sending a shared request was cancelled: someone else sends."""


class RequestCache:
    """A client's cache on the engine loop: single-flight, store lookups, batched writes.

    ``store`` may be None: identical requests in flight are still sent once. With
    ``read=False`` nothing is reused (no store lookups, no joining), with
    ``write=False`` nothing is stored. Every method runs on the engine loop; store
    calls go to one dedicated thread. A failing store (a full
    disk, a locked file) is logged and treated as a miss: it never fails a request.
    """

    def __init__(
        self, store: Cache | None, *, read: bool = True, write: bool = True,
        owns_store: bool = True,
    ) -> None:
        self.store = store
        self.read = read
        self.write = write
        self._owns_store = owns_store
        self._flights: dict[str, asyncio.Future[ReplyLike]] = {}
        # Replies not yet committed to the store are served from here, so a batch
        # repeated right away hits even while its writes are still on the thread.
        self._pending: dict[str, ReplyLike] = {}
        self._writing: dict[str, ReplyLike] = {}
        self._write_done: asyncio.Future[None] | None = None
        self._thread = _StoreThread()
        self._warned = False
        self._closed = False
        if store is not None:
            engine.on_shutdown(self.aclose)

    async def prepare(
        self, base_url: str | None, bodies: Sequence[Mapping[str, Any]]
    ) -> tuple[list[str | None], dict[str, ReplyLike]]:
        """The keys of ``bodies`` and the replies already known for them.

        One trip to the cache thread computes the keys (hashing 100 chunks of 500 KB
        takes a tenth of a second: not on the engine loop) and asks the store for all
        of them at once. Replies received but not yet committed count as known too.
        """
        store = self.store if self.read else None
        if store is None and (len(bodies) <= 1 or _text_size(bodies) <= _INLINE_KEY_CHARS):
            # Nothing to look up and little to hash: a trip to the cache thread would
            # cost more than the hashing.
            make = _KeyMaker(base_url).key
            keys = [make(b) for b in bodies]
            found: dict[str, ReplyLike] = {}
        else:
            keys, found, error = await asyncio.wrap_future(
                self._thread.submit(_keys_and_hits, store, base_url, bodies)
            )
            if error is not None:
                self._warn("read", error)
        if self.read and (self._pending or self._writing):
            pending, writing = self._pending, self._writing
            for key in keys:
                if key is not None and (reply := pending.get(key) or writing.get(key)):
                    found[key] = reply
        return keys, found

    async def resolve(
        self,
        key: str | None,
        send: Callable[[], Awaitable[R]],
        known: ReplyLike | None = None,
    ) -> tuple[R | ReplyLike, bool]:
        """The reply for one request and whether it was reused (not sent by this call).

        ``known`` is this key's entry from ``prepare``. Otherwise the call joins an
        identical request in flight, or becomes the one that sends (``send()``) and
        stores the reply. If that sender is cancelled, a waiting caller sends instead;
        if it fails, every caller waiting on it gets the same error.
        """
        if key is None:
            return await send(), False
        if known is not None:
            return known, True
        if not self.read:
            reply = await send()
            self._store_later(key, reply)
            return reply, False
        flights = self._flights
        while (flight := flights.get(key)) is not None:
            try:
                return await asyncio.shield(flight), True
            except _LeaderGone:
                continue
        reply = self._pending.get(key) or self._writing.get(key)
        if reply is not None:
            return reply, True
        flight = asyncio.get_running_loop().create_future()
        flights[key] = flight
        try:
            reply = await send()
        except BaseException as exc:
            if flights.get(key) is flight:
                del flights[key]
            flight.set_exception(
                _LeaderGone() if isinstance(exc, asyncio.CancelledError) else exc
            )
            # Waiters read it; with none, mark it read so asyncio does not warn.
            flight.exception()
            raise
        if flights.get(key) is flight:
            del flights[key]
        flight.set_result(reply)
        self._store_later(key, reply)
        return reply, False

    async def flush(self) -> None:
        """Wait until every reply received so far is committed to the store."""
        while self._write_done is not None:
            await asyncio.shield(self._write_done)

    async def aclose(self) -> None:
        """Flush, stop the cache thread and close the store if this cache opened it."""
        if self._closed:
            return
        self._closed = True
        engine.remove_shutdown_hook(self.aclose)
        await self.flush()
        if self.store is not None and self._owns_store:
            await asyncio.wrap_future(self._thread.submit(self.store.close))
        self._thread.stop()

    # -- internals ----------------------------------------------------------------

    def _store_later(self, key: str, reply: ReplyLike) -> None:
        if self.write and self.store is not None and not self._closed:
            self._pending[key] = reply
            if self._write_done is None:
                self._start_write()

    def _start_write(self) -> None:
        # One write at a time: replies that arrive meanwhile pile up in _pending and
        # go in the next transaction, so a 10,000-item batch is a few commits.
        assert self.store is not None
        batch, self._pending = self._pending, {}
        self._writing = batch
        loop = asyncio.get_running_loop()
        done = self._write_done = loop.create_future()
        future = self._thread.submit(self.store.put_many, batch)

        def finished(f: concurrent.futures.Future[None]) -> None:
            loop.call_soon_threadsafe(self._wrote, f, done)

        future.add_done_callback(finished)

    def _wrote(self, f: concurrent.futures.Future[None], done: asyncio.Future[None]) -> None:
        self._writing = {}
        exc = f.exception()
        if exc is not None:
            self._warn("write", exc)
        if self._pending:
            self._start_write()
        else:
            self._write_done = None
        done.set_result(None)

    def _warn(self, what: str, exc: BaseException) -> None:
        if not self._warned:
            self._warned = True
            log.warning("rlm cache %s failed (%s: %s); going on without it for these "
                        "replies", what, type(exc).__name__, exc)
