"""`logs/phase_log.jsonl`: one line per step run and per phase event, written by process 0.

The log is also how a resumed run knows what a finished phase still owes (its eval, its
`phases/` params, its `phase_end` line). A kill can tear the last line; readers skip it, or any
unreadable line (and say so), and `rewind` rewrites the file whole, so appends always start on a new line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax

from phased_jax.errors import DataError
from phased_jax.fileio import BadRecord, jsonl_records, write_text_atomic


def read_events(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON objects of a JSONL log, and the number of unreadable lines skipped (a kill
    mid-write tears the last line; a log line never stops a resume: at worst a phase redoes
    work it owes, which is idempotent)."""
    if not path.exists():
        return [], 0
    rows = [row for _, row in jsonl_records(path, error=DataError)]
    events = [r for r in rows if not isinstance(r, BadRecord)]
    return events, len(rows) - len(events)


class RunLog:
    """The run's event log; on resume, lines past the restored step are dropped (they were
    undone), so the log shows every step of the finished run exactly once."""

    def __init__(self, path: Path):
        self.path = path
        self.enabled = jax.process_index() == 0
        if self.enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._file = None

    def rewind(self, global_step: int) -> list[dict[str, Any]]:
        """Drop step lines after `global_step` and torn lines, here and in `metrics.jsonl`;
        returns this log's kept events (none on processes other than 0)."""
        if not self.enabled:
            return []
        kept_here: list[dict[str, Any]] = []
        for path in (self.path, self.path.with_name("metrics.jsonl")):
            if not path.exists():
                continue
            events, torn = read_events(path)
            if torn:
                print(f"note: skipped {torn} torn line(s) in {path} (a kill mid-write)", flush=True)
            kept = [e for e in events if e.get("step", -1) <= global_step]
            write_text_atomic(path, "".join(json.dumps(e) + "\n" for e in kept))
            if path == self.path:
                kept_here = kept
        return kept_here

    def write(self, **event: Any) -> None:
        """Append one whole line (one write call, flushed)."""
        if not self.enabled:
            return
        if self._file is None:
            self._file = open(self.path, "a")  # noqa: SIM115 (closed in close())
        self._file.write(json.dumps({"time": round(time.time(), 3), **event}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
