"""Instruction-data and answer formats: which one a file holds, its rows, each row's fields.

The one parser of training (`phased_jax.data.records` adds validation and the skip report) and
of `phased-score` (`phased_tools.records` stops at the first problem and keeps empty outputs):
each caller decides what a problem costs, not how a row is read.

- `alpaca`: a JSON list of `{"instruction", "input", "output"}` (Stanford Alpaca).
- `authors`: JSONL `{"id", "score", "data": ["<instruction>\\n<input>", "<output>"]}` (the Phased
  IFT release). The prompt is split at its first newline into instruction and input; the score
  is a string that may carry trailing newlines.
- `jsonl`: JSONL (or a JSON list) with named fields (`DEFAULT_FIELDS`, or the caller's names).
- answers: `AnswerRow`, one `{test_set, id, instruction, input, output}` a line, what
  `phased-jax generate` and the demo write and `phased-judge` reads.

Bytes are read by `phased_jax.fileio`: a bad byte, an over-long record or bad JSON is a
`BadRecord` of its own line (or list item); a JSON list broken between its items is a
`ListError`, since the rest of it cannot be located. JAX-free: the tools import it.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from phased_jax.fileio import (
    LONE_SURROGATE,
    SURROGATE_ESCAPE,
    BadRecord,
    encodable,
    jsonl_records,
    open_bytes,
    read_head,
    read_text,
)

DEFAULT_FIELDS = {"instruction": "instruction", "input": "input", "output": "output",
                  "score": "score", "id": "id"}
_WS = re.compile(r"[ \t\n\r]*")
# Bytes that are not UTF-8 read (errors="surrogateescape") as U+DC80..U+DCFF, which valid UTF-8
# never yields: an item holding one is a bad record, not a crash of the whole file.
_UNDECODABLE = re.compile("[\udc80-\udcff]")


class InputError(ValueError):
    """Bad input data (the tools' one error line); the message names the file, the line and
    what to do."""


class RowError(ValueError):
    """A row that cannot be used as it stands; `reason` is its key in a skip report
    (`missing_field`, `bad_type`, ...; training's validation adds its own)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class ListError(ValueError):
    """A JSON list broken between its items, at `line`; `syntax` is the JSON parser's own
    message when the list is not valid JSON there (None for a structural or byte problem)."""

    def __init__(self, line: int, message: str, syntax: str | None = None):
        super().__init__(message)
        self.line, self.syntax = line, syntax


class Missing:
    """The value of a field a row does not have (None is a value: JSON null)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING = Missing()


@dataclass(frozen=True)
class Row:
    """What one row says in its format, before any caller decides what is valid."""

    instruction: str
    input: str
    output: str
    score: Any  # the score field as written ("4.25\n\n", 3.5, ...), or MISSING
    id: Any  # the id field as written, or MISSING
    score_field: str  # where the score was looked for, for messages


def parse_score_text(s: Any) -> float | None:
    """A released score ("4", "4.25\\n\\n", 3.5) as a float, or None when it is not a number."""
    if isinstance(s, bool):
        return None
    if isinstance(s, int | float):
        return float(s)
    if isinstance(s, str):
        try:
            return float(s.strip())
        except ValueError:
            return None
    return None


def is_json_list(head: bytes) -> bool:
    """Whether a file starting with `head` holds a JSON list (else it is JSONL)."""
    return head.removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"[")


def looks_like_authors(obj: Mapping[str, Any], instruction_field: str = "instruction") -> bool:
    """Whether a row is in the authors' shape: a `data` list and no instruction field."""
    return isinstance(obj.get("data"), list) and instruction_field not in obj


def _item_problem(text: str, start: int, end: int, obj: Any, line: int, item: int,
                  max_record_bytes: int, lone_escapes: bool) -> BadRecord | None:
    if bad := _UNDECODABLE.search(text, start, end):
        return BadRecord(line, "not_utf8", f"not UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x})",
                         item=item)
    if (end - start) * 4 > max_record_bytes:  # a char is at most 4 bytes: count only if it may matter
        n = len(text[start:end].encode("utf-8", errors="surrogateescape"))
        if n > max_record_bytes:
            return BadRecord(line, "too_long", f"record too long ({n:,} bytes > "
                             f"{max_record_bytes:,})", n, item)
    if lone_escapes and not encodable(obj):
        return BadRecord(line, "malformed", LONE_SURROGATE, item=item)
    return None


def json_list_records(text: str, max_record_bytes: int) -> Iterator[tuple[int, int, Any]]:
    """(line, item number, item or BadRecord) of a file holding one JSON list.

    Parsed item by item, so each can be sized (UTF-8 bytes of its JSON text) and named by its
    line. `text` may carry undecodable bytes as surrogate escapes: an item holding one is a
    `not_utf8` BadRecord. Raises ListError where the list itself is broken.
    """
    decoder = json.JSONDecoder()
    lone_escapes = SURROGATE_ESCAPE.search(text) is not None

    def broken(pos: int, message: str, syntax: str | None = None) -> ListError:
        if bad := _UNDECODABLE.match(text, pos):  # a bad byte outside the items breaks the list
            message, syntax = f"not UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x})", None
        return ListError(text.count("\n", 0, pos) + 1, message, syntax)

    i = _WS.match(text).end()
    if not text.startswith("[", i):
        raise broken(i, "expected a JSON list")
    i = _WS.match(text, i + 1).end()
    line, counted, k = 1, 0, 0
    while not text.startswith("]", i):
        k += 1
        line += text.count("\n", counted, i)
        counted = i
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise broken(e.pos, f"not valid JSON ({e.msg} at column {e.colno})", e.msg) from None
        except (ValueError, RecursionError) as e:
            why = str(e)[:100] or type(e).__name__
            raise broken(i, f"not valid JSON (item {k}: {why})", why) from None
        bad = _item_problem(text, i, end, obj, line, k, max_record_bytes, lone_escapes)
        yield line, k, obj if bad is None else bad
        i = _WS.match(text, end).end()
        if text.startswith(",", i):
            i = _WS.match(text, i + 1).end()
        elif i >= len(text):
            raise broken(i, "the list is not closed with ']'")
        elif not text.startswith("]", i):
            raise broken(i, f"expected ',' or ']' after item {k}")
    i = _WS.match(text, i + 1).end()
    if i < len(text):
        raise broken(i, "extra data after the list")


def file_records(path: str | Path, max_record_bytes: int, error: type[Exception] = ValueError,
                 *, strict_utf8: bool = False) -> Iterator[tuple[int, int, Any]]:
    """(line, item number or 0, parsed row or BadRecord) of a JSON list or a JSONL file.

    `strict_utf8`: a bad byte anywhere in a JSON list fails the whole file (as `error`) instead
    of its item. JSONL is always read line by line.
    """
    path = Path(path)
    if not is_json_list(read_head(path, error)):
        for line, obj in jsonl_records(path, max_record_bytes, error):
            yield line, 0, obj
        return
    if strict_utf8:
        text = read_text(path, error)
    else:
        with open_bytes(path, error) as f:
            text = f.read().removeprefix(codecs.BOM_UTF8).decode("utf-8", "surrogateescape")
    yield from json_list_records(text, max_record_bytes)


def detect_format(path: str | Path, max_record_bytes: int, error: type[Exception] = ValueError,
                  instruction_field: str = "instruction") -> str:
    """`alpaca` (a JSON list), else `authors` or `jsonl` by the first row; an empty file is
    `error`. An unreadable first row says `jsonl`: reading it then names what is wrong."""
    path = Path(path)
    if is_json_list(read_head(path, error)):
        return "alpaca"
    for _, obj in jsonl_records(path, max_record_bytes, error):
        authors = not isinstance(obj, BadRecord) and looks_like_authors(obj, instruction_field)
        return "authors" if authors else "jsonl"
    raise error(f"{path}: the file is empty")


def _text(obj: Mapping[str, Any], name: str, optional: bool) -> str:
    if not name:
        return ""  # the format has no such field
    if obj.get(name) is None:
        if optional:
            return ""
        if name not in obj:
            raise RowError("missing_field",
                             f"missing field {name!r} (fields present: {sorted(obj)})")
    value = obj[name]
    if not isinstance(value, str):
        raise RowError("bad_type", f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def row_fields(obj: Any, fields: Mapping[str, str] = DEFAULT_FIELDS, fmt: str = "auto",
               optional: Collection[str] = ()) -> Row:
    """The fields of one parsed row; RowError if its shape does not fit.

    Authors-shaped rows (`fmt` "authors", or under "auto"/"scored" `looks_like_authors`) split
    their prompt; other rows read `fields` (an empty name: the format has no such field). A
    field named in `optional` ("input") may be absent or null, read as ""; every other must be
    a string.
    """
    if not isinstance(obj, dict):
        raise RowError("malformed", f"expected a JSON object, got {type(obj).__name__}")
    if fmt == "authors" or (fmt in ("auto", "scored")
                            and looks_like_authors(obj, fields["instruction"])):
        data = obj.get("data")
        if not (isinstance(data, list) and len(data) == 2 and all(isinstance(d, str) for d in data)):
            raise RowError("missing_field", "field 'data' must be a list of two strings "
                                              "[prompt, output] (authors' format)")
        instruction, _, input_ = data[0].partition("\n")
        return Row(instruction, input_, data[1], obj.get("score", MISSING),
                   obj.get("id", MISSING), "score")
    instruction, input_, output = (_text(obj, fields[k], k in optional)
                                   for k in ("instruction", "input", "output"))
    score_field, id_field = fields.get("score", ""), fields.get("id", "")
    return Row(instruction, input_, output,
               obj.get(score_field, MISSING) if score_field else MISSING,
               obj.get(id_field, MISSING) if id_field else MISSING, score_field)


@dataclass(frozen=True)
class AnswerRow:
    """One model answer to one test question: a line of an answer file. `where` (file:line)
    is for messages only and is not written."""

    test_set: str
    id: str
    instruction: str
    input: str
    output: str
    where: str = field(default="", compare=False)

    def to_row(self) -> dict[str, str]:
        row = asdict(self)
        del row["where"]
        return row

    @classmethod
    def from_row(cls, obj: Mapping[str, Any], where: str) -> AnswerRow:
        """The answer on one line; InputError naming `where` for a missing or non-string field."""
        for name in ("test_set", "id", "instruction", "output"):
            if obj.get(name) is None:
                raise InputError(f"{where}: missing field {name!r}; answer files need "
                                 "{test_set, id, instruction, input, output} on every line")
        for name in ("instruction", "input", "output"):
            if obj.get(name) is not None and not isinstance(obj[name], str):
                raise InputError(f"{where}: field {name!r} must be a string")
        return cls(str(obj["test_set"]), str(obj["id"]), obj["instruction"],
                   obj.get("input") or "", obj["output"], where)
