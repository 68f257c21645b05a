"""The input rows of validated records, whole, so the scored output keeps every field.

`read_records` keeps only what training needs; `phased-score`'s format keeps the row as it was
read. Each record's `source` is `file:line`, so its row is read again from that file by the
same parser (`phased_jax.formats`). A record from a Hugging Face dataset (no file) becomes
`{id, instruction, input, output}` or `{id, messages}` (and `score` if it had one).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from phased_jax.data.records import Record
from phased_jax.errors import DataError
from phased_jax.fileio import BadRecord
from phased_jax.formats import as_messages, file_records


def rows_by_source(paths: Sequence[str], limit: int) -> dict[str, list[Any]]:
    """`file:line` -> the rows parsed there, in order (a one-line JSON list holds several)."""
    out: dict[str, list[Any]] = defaultdict(list)
    for path in paths:
        for line, _, obj in file_records(path, limit, DataError):
            if not isinstance(obj, BadRecord):
                out[f"{path}:{line}"].append(obj)
    return out


def fallback_row(r: Record) -> dict[str, Any]:
    row: dict[str, Any] = (
        {"id": r.id, "messages": as_messages(r.messages)}
        if r.messages else
        {"id": r.id, "instruction": r.instruction, "input": r.input, "output": r.output})
    if r.score is not None:
        row["score"] = r.score
    return row


def input_rows(records: Sequence[Record], max_record_bytes: int) -> list[dict[str, Any]]:
    """Each record's input row (a fresh dict) in the records' order; `max_record_bytes` as the
    records were read with (`data.max_record_bytes`)."""
    files = sorted({src for r in records if Path(src := r.source.rsplit(":", 1)[0]).is_file()})
    by_source = rows_by_source(files, max_record_bytes)
    per_source = Counter(r.source for r in records)
    out = []
    for r in records:
        found = by_source.get(r.source)
        # A line whose rows were not all kept (a skipped record in a one-line JSON list) cannot
        # be paired row by row: its records get the fallback row, never a neighbour's row.
        obj = found.pop(0) if found and len(found) == per_source[r.source] else None
        if obj is not None:
            per_source[r.source] -= 1
        out.append(dict(obj) if isinstance(obj, dict) else fallback_row(r))
    return out
