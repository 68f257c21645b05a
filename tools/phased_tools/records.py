"""What the tools read: instruction data for `phased-score`, answer files for `phased-judge`.

Formats (auto-detected, or forced with --format) and the parser are `phased_jax.formats`, the
one training uses. The tools' policy on top of it:
- The first problem stops the run with one line naming the file and line and what to do (a
  flag to pass, a file to convert): nothing is sent for a file that is partly wrong.
- Empty outputs (9 rows in the authors' stage-3 file) are kept, never dropped: they are counted
  and their lines reported, so the caller can warn. Training treats them as invalid.
- The input field may be absent or null (read as ""); the instruction and output may not.
- A record longer than `max_record_bytes` (default 1 MiB, `--max-record-bytes`) is refused
  before it is parsed, so one runaway line cannot fill memory or hide a wrong format.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phased_jax.fileio import (
    DEFAULT_MAX_RECORD_BYTES,
    BadRecord,
    describe,
    iter_jsonl,
    read_head,
    sniff_binary,
)
from phased_jax.formats import (
    AnswerRow,
    InputError,
    ListError,
    RowError,
    detect_format,
    file_records,
    is_json_list,
    parse_score_text,
    row_fields,
)

FORMATS = ("auto", "alpaca", "authors", "jsonl")
LIMIT_HINT = "raise the limit with --max-record-bytes if the record is meant to be that long"
FIELD_HINT = ("name the right field with --instruction-field/--input-field/--output-field "
              "or pick --format")


@dataclass
class Record:
    """One instruction example; `raw` is the original object, kept whole for the output."""

    instruction: str
    input: str
    output: str
    raw: dict[str, Any]
    line: int  # 1-based line in a JSONL file, 1-based position in a JSON list
    prior_score: float | None = None


@dataclass
class LoadReport:
    """What was read, including the rows that need a warning."""

    path: Path
    format: str
    n: int = 0
    empty_output_lines: list[int] = field(default_factory=list)


def positive_bytes(value: str) -> int:
    """argparse type for --max-record-bytes: a positive integer (1000000, 1_000_000 or 4e6)."""
    try:
        n = int(float(value)) if any(c in value for c in ".eE") else int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of bytes: {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def load_records(
    path: str | Path,
    fmt: str = "auto",
    *,
    instruction_field: str = "instruction",
    input_field: str = "input",
    output_field: str = "output",
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> tuple[list[Record], LoadReport]:
    """Read every record of `path`; raise InputError (file:line, what to do) on bad data or bytes."""
    path = Path(path)
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    head = read_head(path, InputError)
    if binary := sniff_binary(head):
        raise InputError(f"{path}: {binary.why}")
    if fmt == "auto":
        fmt = detect_format(path, max_record_bytes, InputError, instruction_field)
    elif fmt == "alpaca" and not is_json_list(head):
        raise InputError(f"{path}: expected a JSON list of objects (Alpaca format)")
    fields = {"instruction": instruction_field, "input": input_field, "output": output_field,
              "score": "score", "id": "id"}
    records: list[Record] = []
    try:
        for line, item, obj in file_records(path, max_record_bytes, InputError, strict_utf8=True):
            if isinstance(obj, BadRecord):
                raise InputError(f"{path}:{line}: {describe(obj, max_record_bytes, LIMIT_HINT)}")
            where = item or line  # a list item is named by its position
            try:
                row = row_fields(obj, fields, fmt, optional=("input",))
            except RowError as e:
                hint = f"; {FIELD_HINT}" if e.reason == "missing_field" else ""
                raise InputError(f"{path}:{where}: {e}{hint}") from None
            records.append(Record(row.instruction, row.input, row.output, obj, where,
                                  parse_score_text(row.score)))
    except ListError as e:
        raise InputError(f"{path}:{e.line}: {e}; expected a JSON list of objects "
                         "(Alpaca format)") from None
    if not records:
        raise InputError(f"{path}: no records found")
    empty = [r.line for r in records if not r.output.strip()]
    return records, LoadReport(path, fmt, len(records), empty)


def load_answers(
    path: str | Path, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
) -> dict[tuple[str, str], AnswerRow]:
    """Answers keyed by (test_set, id); a duplicate or malformed row or a bad byte is an InputError naming it."""
    path = Path(path)
    rows: dict[tuple[str, str], AnswerRow] = {}
    first_line: dict[tuple[str, str], int] = {}
    for lineno, obj in iter_jsonl(path, InputError, max_record_bytes, limit_hint=LIMIT_HINT):
        row = AnswerRow.from_row(obj, f"{path}:{lineno}")
        key = (row.test_set, row.id)
        if key in rows:
            raise InputError(f"{row.where}: duplicate (test_set, id) = {key}, first on line "
                             f"{first_line[key]}; each question must appear once")
        rows[key], first_line[key] = row, lineno
    if not rows:
        raise InputError(f"{path}: no answers found")
    return rows
