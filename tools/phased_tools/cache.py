"""Crash-safe answer cache: SQLite in WAL mode, every answer committed before it is used.

Every reply is committed (synchronous=FULL, so it is on disk) as it arrives, before it is used.
A run killed with SIGKILL and started again finds every answer it already paid for and re-sends
only what has none. The key is a hash of (model, messages, params); the API key, the base URL
and anything else about the transport are never part of the row.

Many workers answering at once share commits (`GroupCommitter`): the writer thread takes every
answer waiting, writes them in one transaction with one fsync, then releases their waiters. At
300 answers/s that is a few commits a second instead of 300, which is most of the client's
per-request CPU that the cache costs, and it is no less durable: no waiter goes on before its
row is on disk.

Opening is safe when many runs start at once on a new cache: switching a new file to WAL and
creating the table need a lock that SQLite's busy handler does not always wait for, so both are
retried with backoff (and skipped when another run has already done them).
"""

from __future__ import annotations

import hashlib
import json
import queue
import random
import sqlite3
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    request TEXT NOT NULL,
    content TEXT NOT NULL,
    finish_reason TEXT,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
)
"""


def request_key(model: str, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
    """Stable hash of everything that determines a reply, so equal requests share one answer."""
    blob = json.dumps(
        {"model": model, "messages": messages, "params": params},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


_OPEN_TIMEOUT_S = 60.0
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6


class CacheError(RuntimeError):
    """The cache cannot be opened (not a database, no permission, locked for a minute)."""


def _is_busy(e: sqlite3.OperationalError) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    return "locked" in str(e) or "busy" in str(e)


def _retry_busy(fn: Any, deadline: float) -> Any:
    """fn() again with jittered backoff while SQLite answers busy/locked, until `deadline`."""
    delay = 0.002
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as e:
            if not _is_busy(e) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 0.25)


_INSERT = "INSERT OR IGNORE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?)"


@dataclass(frozen=True)
class CachedAnswer:
    """One stored reply with the usage it cost when it was first paid for."""

    content: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class AnswerCache:
    """SQLite WAL store of replies; safe to share between processes and concurrent runs."""

    def __init__(self, path: str | Path, timeout: float = _OPEN_TIMEOUT_S) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db, self._wdb = _retry_busy(lambda: self._connect(timeout), time.monotonic() + timeout)
        except (sqlite3.Error, OSError) as e:
            raise CacheError(
                f"cannot open the answer cache {self.path}: {e}; pass another --cache "
                "(or delete this file if it is not an answer cache)"
            ) from None
        self._wlock = threading.Lock()

    def _connect(self, timeout: float) -> tuple[sqlite3.Connection, sqlite3.Connection]:
        # isolation_level=None: autocommit, every INSERT is its own durable transaction.
        # Two connections: reads on the caller's thread never wait behind a writer's fsync
        # (WAL lets them run side by side); writes may come from a worker thread.
        db = wdb = None
        try:
            db = sqlite3.connect(str(self.path), isolation_level=None, timeout=timeout)
            # WAL is a property of the file: only the first run needs to switch it, and the
            # switch takes an exclusive lock the busy timeout does not wait for (hence the retry).
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'answers'").fetchone() is None:
                db.execute(_SCHEMA)
            wdb = sqlite3.connect(str(self.path), isolation_level=None, timeout=timeout, check_same_thread=False)
            wdb.execute("PRAGMA synchronous=FULL")
            return db, wdb
        except BaseException:
            for c in (db, wdb):
                if c is not None:
                    c.close()
            raise

    def get(self, key: str) -> CachedAnswer | None:
        """The stored answer for `key`, or None if it was never paid for."""
        row = self._db.execute(
            "SELECT content, finish_reason, prompt_tokens, completion_tokens FROM answers"
            " WHERE key = ?",
            (key,),
        ).fetchone()
        return None if row is None else CachedAnswer(*row)

    def put(
        self,
        key: str,
        model: str,
        request: dict[str, Any],
        answer: CachedAnswer,
    ) -> None:
        """Commit one answer to disk (thread-safe); a duplicate key keeps the first answer."""
        with self._wlock:
            self._put(key, model, request, answer)

    def _put(self, key: str, model: str, request: dict[str, Any], answer: CachedAnswer) -> None:
        self._wdb.execute(_INSERT, _row(key, model, request, answer))

    def put_many(self, rows: list[tuple[Any, ...]]) -> None:
        """Commit many `_row`s in one transaction (one fsync); all or none reach the disk."""
        with self._wlock:
            self._wdb.execute("BEGIN IMMEDIATE")
            try:
                self._wdb.executemany(_INSERT, rows)
            except BaseException:
                self._wdb.execute("ROLLBACK")
                raise
            self._wdb.execute("COMMIT")

    def __contains__(self, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM answers WHERE key = ?", (key,)).fetchone() is not None

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def keys(self) -> set[str]:
        """All stored keys (used by tests and --dry-run)."""
        return {k for (k,) in self._db.execute("SELECT key FROM answers")}

    def close(self) -> None:
        with self._wlock:
            self._wdb.close()
        self._db.close()


def _row(key: str, model: str, request: dict[str, Any], answer: CachedAnswer) -> tuple[Any, ...]:
    return (
        key,
        model,
        json.dumps(request, ensure_ascii=False, sort_keys=True),
        answer.content,
        answer.finish_reason,
        answer.prompt_tokens,
        answer.completion_tokens,
        time.time(),
    )


class GroupCommitter:
    """One writer thread that commits whatever answers are waiting together (see module doc).

    `submit` returns a Future that resolves once the row is on disk, or carries the write's
    error; a row whose waiter was cancelled is still written (it was paid for). `close` writes
    what is queued and stops the thread.
    """

    def __init__(self, cache: AnswerCache, max_batch: int = 512) -> None:
        self.cache = cache
        self.max_batch = max_batch
        self._q: queue.SimpleQueue[tuple[tuple[Any, ...], Future[None]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="answer-cache-writer", daemon=True)
        self._thread.start()

    def submit(self, key: str, model: str, request: dict[str, Any], answer: CachedAnswer) -> Future[None]:
        fut: Future[None] = Future()
        self._q.put((_row(key, model, request, answer), fut))
        return fut

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()

    def _loop(self) -> None:
        stop = False
        while not stop:
            item = self._q.get()
            batch = []
            while item is not None:
                batch.append(item)
                if len(batch) >= self.max_batch:
                    break
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
            stop = item is None
            if not batch:
                continue
            try:
                self.cache.put_many([row for row, _ in batch])
            except BaseException as e:  # every waiter learns its answer was not stored
                for _, fut in batch:
                    if not fut.cancelled():  # a waiter that gave up (its run stopped) needs no word
                        fut.set_exception(e)
            else:
                for _, fut in batch:
                    if not fut.cancelled():
                        fut.set_result(None)
