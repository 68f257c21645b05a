"""Which batches this cache has in flight, recorded before they are waited for.

A row is written (and committed) as soon as the server gives a batch its id, before the first
poll, so a run killed while waiting, started again, finds its batches and waits for them
instead of paying for new ones. The row lists the cache keys the batch answers; it is marked
done once its answers are in the cache. The table lives in the answer cache's own file.
"""

from __future__ import annotations

import json
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
)
"""


@dataclass(frozen=True)
class OpenBatch:
    """A batch created earlier and not yet read back, with the cache keys it answers."""

    batch_id: str
    keys: frozenset[str]


class BatchLedger:
    """The `batches` table of the cache file (open it after AnswerCache, which makes the file WAL)."""

    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, timeout=timeout)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)

    def record(self, batch_id: str, model: str, keys: list[str]) -> None:
        """Remember a created batch (committed before this returns)."""
        self._db.execute("INSERT OR IGNORE INTO batches VALUES (?, ?, ?, 0, ?)",
                         (batch_id, model, json.dumps(keys), time.time()))

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
