"""Which batches this cache has in flight, recorded before they are waited for.

A row is written (and committed) as soon as the server gives a batch its id, before the first
poll, so a run killed while waiting, started again, finds its batches and waits for them
instead of paying for new ones. The row lists the cache keys the batch answers; it is marked
done once its answers are in the cache. The table lives in the answer cache's own file.

The id comes back only after the batch exists, so an intent (a random token, also sent as the
batch's metadata, with the keys) is committed before the upload: a run killed between the
create call and the id's record leaves an intent, which the next run resolves by listing the
server's batches for that token (re-attach) or, when none carries it, drops (send again).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    keys TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_intents (
    token TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    keys TEXT NOT NULL,
    created REAL NOT NULL
);
"""


@dataclass(frozen=True)
class OpenBatch:
    """A batch created earlier and not yet read back, with the cache keys it answers."""

    batch_id: str
    keys: frozenset[str]


@dataclass(frozen=True)
class Intent:
    """A batch about to be created (or created, its id not yet recorded), named by its token."""

    token: str
    keys: list[str]
    created: float


class BatchLedger:
    """The `batches` and `batch_intents` tables of the cache file (open it after AnswerCache, which
    makes the file WAL)."""

    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, timeout=timeout)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def intend(self, model: str, keys: list[str]) -> str:
        """Commit an intent to create a batch of `keys`; its token (for the batch's metadata)."""
        token = secrets.token_hex(16)
        self._db.execute("INSERT INTO batch_intents VALUES (?, ?, ?, ?)",
                         (token, model, json.dumps(keys), time.time()))
        return token

    def intents(self, model: str) -> list[Intent]:
        """Every intent for `model` whose batch id was never recorded, oldest first."""
        rows = self._db.execute(
            "SELECT token, keys, created FROM batch_intents WHERE model = ? ORDER BY created", (model,)
        ).fetchall()
        return [Intent(t, json.loads(k), c) for t, k, c in rows]

    def drop_intent(self, token: str) -> None:
        """Forget an intent whose batch was never created (its keys are sent again)."""
        self._db.execute("DELETE FROM batch_intents WHERE token = ?", (token,))

    def record(self, batch_id: str, model: str, keys: list[str], token: str | None = None) -> None:
        """Remember a created batch, settling its intent (both committed before this returns)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT OR IGNORE INTO batches VALUES (?, ?, ?, 0, ?)",
                             (batch_id, model, json.dumps(keys), time.time()))
            self._db.execute("DELETE FROM batch_intents WHERE token = ?", (token,))

    def mark_done(self, batch_id: str) -> None:
        self._db.execute("UPDATE batches SET done = 1 WHERE batch_id = ?", (batch_id,))

    def open_batches(self, model: str) -> list[OpenBatch]:
        """Every batch for `model` not yet read back, oldest first."""
        rows = self._db.execute(
            "SELECT batch_id, keys FROM batches WHERE done = 0 AND model = ? ORDER BY created", (model,)
        ).fetchall()
        return [OpenBatch(b, frozenset(json.loads(k))) for b, k in rows]

    def close(self) -> None:
        self._db.close()
