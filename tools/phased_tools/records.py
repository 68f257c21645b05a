"""What the tools read: instruction data for `phased-score`, answer files for `phased-judge`.

Formats (auto-detected, or forced with --format) and the parser are `phased_jax.formats`, the
one training uses. The tools' policy on top of it:
- The first problem stops the run with one line naming the file and line and what to do (a
  flag to pass, a file to convert): nothing is sent for a file that is partly wrong.
- Empty outputs (9 rows in the authors' stage-3 file) are kept, never dropped: they are counted
  and their lines reported, so the caller can warn. Training treats them as invalid.
- The input field may be absent or null (read as ""); the instruction and output may not.
- Conversations (`messages`, `sharegpt`) keep their turns in `Record.messages`; their
  instruction and output are the first exchange. One that ends with a user turn is refused
  (nothing answers it, so there is nothing to rate), and a file holds one shape: a single-turn
  row among conversations, or a conversation among single-turn rows, is refused naming the
  file's first row.
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
    CONVERSATION_FORMATS,
    AnswerRow,
    InputError,
    ListError,
    RowError,
    Turn,
    check_shape,
    conversation_style,
    detect_format,
    exchange,
    file_records,
    is_json_list,
    parse_score_text,
    row_fields,
)

FORMATS = ("auto", "alpaca", "authors", "jsonl", *CONVERSATION_FORMATS)
LIMIT_HINT = "raise the limit with --max-record-bytes if the record is meant to be that long"
FIELD_HINT = ("name the right field with --instruction-field/--input-field/--output-field "
              "(--messages-field/--conversations-field for conversations) or pick --format")
CONVERSATION_HINT = ("name the list field with --messages-field/--conversations-field "
                     "or pick --format")
FIX_HINT = "fix or remove that conversation"


@dataclass
class Record:
    """One instruction example; `raw` is the original object, kept whole for the output.

    A conversation's `instruction`/`output` are its first exchange and `messages` all its turns.
    """

    instruction: str
    input: str
    output: str
    raw: dict[str, Any]
    line: int  # 1-based line in a JSONL file, 1-based position in a JSON list
    prior_score: float | None = None
    messages: tuple[Turn, ...] = ()  # () for a single-turn row

    @property
    def turns(self) -> tuple[Turn, ...]:
        """The record as a conversation: its turns, or a single-turn row's one exchange (the
        instruction and, after a newline, the input as the user turn, as training reads it)."""
        return self.messages or exchange(self.instruction, self.input, self.output)


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
    messages_field: str = "messages",
    conversations_field: str = "conversations",
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> tuple[list[Record], LoadReport]:
    """Read every record of `path`; raise InputError (file:line, what to do) on bad data or bytes.

    The first row decides the file's shape (a conversation or not) under `auto`, so a renamed
    list field (`messages_field`) is found where the detection by default names is not.
    """
    path = Path(path)
    asked = fmt
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    head = read_head(path, InputError)
    if binary := sniff_binary(head):
        raise InputError(f"{path}: {binary.why}")
    if fmt == "alpaca" and not is_json_list(head):
        raise InputError(f"{path}: expected a JSON list of objects (Alpaca format)")
    fields = {"instruction": instruction_field, "input": input_field, "output": output_field,
              "score": "score", "id": "id", "messages": messages_field,
              "conversations": conversations_field}
    records: list[Record] = []
    first: tuple[bool, int] | None = None  # (conversation?, where) of the file's first row
    try:
        if fmt == "auto":  # reads the first row: a list broken there is a ListError too
            fmt = detect_format(path, max_record_bytes, InputError, instruction_field)
        for line, item, obj in file_records(path, max_record_bytes, InputError, strict_utf8=True):
            if isinstance(obj, BadRecord):
                raise InputError(f"{path}:{line}: {describe(obj, max_record_bytes, LIMIT_HINT)}")
            where = item or line  # a list item is named by its position
            style = conversation_style(obj, fields, asked) if isinstance(obj, dict) else None
            if isinstance(obj, dict):
                if first is None and style and fmt not in CONVERSATION_FORMATS:
                    fmt = style  # e.g. a renamed list field, which detection (default names) missed
                first = first or (style is not None, where)
                _check_shape(path, where, style is not None, first)
            records.append(_record(path, where, obj, fields, fmt, style is not None))
    except ListError as e:
        shape = "conversations" if fmt in CONVERSATION_FORMATS else "Alpaca format"
        raise InputError(f"{path}:{e.line}: {e}; expected a JSON list of objects "
                         f"({shape})") from None
    if not records:
        raise InputError(f"{path}: no records found")
    empty = [r.line for r in records if not r.output.strip()]
    return records, LoadReport(path, fmt, len(records), empty)


def _check_shape(path: Path, where: int, talk: bool, first: tuple[bool, int]) -> None:
    """InputError unless a row has the shape of the file's first row (training's rule)."""
    try:
        check_shape(talk, first[0], f"{path}:{first[1]}")
    except RowError as e:
        raise InputError(f"{path}:{where}: {e}") from None


def _record(path: Path, where: int, obj: Any, fields: dict[str, str], fmt: str,
            talk: bool) -> Record:
    """One row as a Record; InputError naming `path:where` and what to do if it cannot be scored."""
    try:
        row = row_fields(obj, fields, fmt, optional=("input",))
    except RowError as e:
        hint = ((CONVERSATION_HINT if talk else FIELD_HINT) if e.reason == "missing_field"
                else FIX_HINT if talk and e.reason not in ("tool_role", "unknown_role",
                                                           "ends_with_user") else "")
        raise InputError(f"{path}:{where}: {e}" + (f"; {hint}" if hint else "")) from None
    return Record(row.instruction, row.input, row.output, obj, where, parse_score_text(row.score),
                  row.messages)


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
