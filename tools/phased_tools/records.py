"""Reading instruction data and answer files, with errors that name the file and line.

Formats (auto-detected, or forced with --format):
- `alpaca`: a JSON list of `{"instruction", "input", "output"}` (Stanford Alpaca).
- `authors`: JSONL `{"id", "score", "data": ["<instruction>\\n<input>", "<output>"]}` (the Phased
  IFT release). The prompt is split at its first newline into instruction and input; the
  released score (a string, maybe with trailing newlines) is kept as `prior_score`.
- `jsonl`: JSONL with `instruction`/`input`/`output` fields, or the names given by
  --instruction-field/--input-field/--output-field.

Empty outputs (9 rows in the authors' stage-3 file) are kept, never dropped: they are counted
and their lines reported, so the caller can warn. The phase pipeline treats them as invalid.

Bad bytes are bad input, never a crash: files are read as bytes and each line (or, for a JSON
list, the file) is decoded strictly, so a non-UTF-8 byte is reported as `FILE:LINE: not UTF-8`;
a file that is binary, compressed or UTF-16 is one error naming the file; and a record longer
than `max_record_bytes` (default 1 MiB, `--max-record-bytes`) is refused before it is parsed,
so one runaway line cannot fill memory or hide a wrong format.
"""

from __future__ import annotations

import argparse
import codecs
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("auto", "alpaca", "authors", "jsonl")
DEFAULT_MAX_RECORD_BYTES = 1 << 20
_SNIFF_BYTES = 8192
_UTF8_HINT = "the file must be UTF-8; convert it, e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8"
_LIMIT_HINT = "raise the limit with --max-record-bytes if the record is meant to be that long"
_MAGIC = (  # first bytes -> what the file is and what to do
    (codecs.BOM_UTF32_LE, "UTF-32 text, not UTF-8; convert it (iconv -f utf-32 -t utf-8)"),
    (codecs.BOM_UTF32_BE, "UTF-32 text, not UTF-8; convert it (iconv -f utf-32 -t utf-8)"),
    (codecs.BOM_UTF16_LE, "UTF-16 text, not UTF-8; convert it (iconv -f utf-16 -t utf-8)"),
    (codecs.BOM_UTF16_BE, "UTF-16 text, not UTF-8; convert it (iconv -f utf-16 -t utf-8)"),
    (b"\x1f\x8b", "gzip-compressed; decompress it first (gunzip)"),
    (b"\xfd7zXZ\x00", "xz-compressed; decompress it first (unxz)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed; decompress it first (unzstd)"),
    (b"PK\x03\x04", "a zip archive; extract the data file first (unzip)"),
)
# A \u escape of a UTF-16 surrogate: json.loads accepts a lone one, which no encoder can write.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_WS = re.compile(r"[ \t\n\r]*")


class InputError(ValueError):
    """Bad input data; the message names the file, the line and what to do."""


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


def positive_bytes(value: str) -> int:
    """argparse type for --max-record-bytes: a positive integer (1000000, 1_000_000 or 4e6)."""
    try:
        n = int(float(value)) if any(c in value for c in ".eE") else int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of bytes: {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _binary_reason(head: bytes) -> str | None:
    """Why a file whose first block is `head` is not UTF-8 text at all, or None if it may be."""
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if b"\x00" in head:
        return "a binary file (NUL bytes in its first block), not UTF-8 text; give the JSON/JSONL data file"
    bad = len(head) - len(head.decode("utf-8", "ignore").encode("utf-8"))
    if len(head) >= 64 and bad * 4 > len(head):
        return (f"a binary file ({bad} of its first {len(head)} bytes are not UTF-8), not text; "
                "give the JSON/JSONL data file")
    return None


def _not_utf8(path: Path, line: int, raw: bytes, e: UnicodeDecodeError, col: int) -> str:
    return f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {col}: {e.reason}); {_UTF8_HINT}"


def _open(path: Path, error: type[Exception]) -> Any:
    if path.is_dir():
        raise error(f"{path}: is a folder; give a data file")
    try:
        return open(path, "rb", buffering=_SNIFF_BYTES)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None


def iter_lines(
    path: str | Path,
    error: type[Exception] = InputError,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without its line end) of every line, decoded strictly.

    Lines are read one at a time as bytes, so a bad byte names its line and a runaway line is
    refused after `max_record_bytes` bytes instead of being read whole. Raises `error`.
    """
    path = Path(path)
    with _open(path, error) as f:
        try:
            why = _binary_reason(f.peek(_SNIFF_BYTES)[:_SNIFF_BYTES])
            if why:
                raise error(f"{path}: {why}")
            lineno = 0
            while raw := f.readline(max_record_bytes + 2):
                lineno += 1
                if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]
                ended = raw.endswith(b"\n")
                size = len(raw) - ended - raw.endswith(b"\r\n")
                if size > max_record_bytes:
                    while not ended and (more := f.readline(1 << 20)):  # count it, do not keep it
                        ended = more.endswith(b"\n")
                        size += len(more) - ended - more.endswith(b"\r\n")
                    raise error(f"{path}:{lineno}: record too long ({size:,} bytes > {max_record_bytes:,}; "
                                f"{_LIMIT_HINT})")
                try:
                    text = raw[:size].decode("utf-8")
                except UnicodeDecodeError as e:
                    raise error(_not_utf8(path, lineno, raw, e, e.start + 1)) from None
                yield lineno, text
        except OSError as e:
            raise error(f"{path}: cannot read ({e.strerror})") from None


def read_text(path: str | Path, error: type[Exception] = InputError) -> str:
    """The whole file decoded strictly (a JSON list, a template); errors name file:line."""
    path = Path(path)
    with _open(path, error) as f:
        try:
            data = f.read()
        except OSError as e:
            raise error(f"{path}: cannot read ({e.strerror})") from None
    why = _binary_reason(data[:_SNIFF_BYTES])
    if why:
        raise error(f"{path}: {why}")
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - data.rfind(b"\n", 0, e.start)
        raise error(_not_utf8(path, line, data, e, col)) from None


def _loads(path: Path, line: int, text: str, error: type[Exception], what: str) -> Any:
    """json.loads with every failure (bad JSON, nesting, giant numbers, lone surrogates) as `error`."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}:{line}: not valid JSON ({e.msg} at column {e.colno}); {what}") from None
    except (ValueError, RecursionError) as e:
        raise error(f"{path}:{line}: not valid JSON ({str(e)[:100] or type(e).__name__}); {what}") from None
    if _SURROGATE_ESCAPE.search(text):
        _check_encodable(path, line, obj, error)
    return obj


def _check_encodable(path: Path, line: int, obj: Any, error: type[Exception]) -> None:
    if not _encodable(obj):
        raise error(f"{path}:{line}: a \\u escape encodes half of a UTF-16 surrogate pair, which is "
                    "not text; fix or remove that escape")


def _encodable(obj: Any) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def iter_jsonl(
    path: str | Path,
    error: type[Exception] = InputError,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line; bad bytes or JSON raise `error` naming file:line."""
    path = Path(path)
    for lineno, line in iter_lines(path, error, max_record_bytes):
        if not line.strip():
            continue
        obj = _loads(path, lineno, line, error, "each line must be one JSON object")
        if not isinstance(obj, dict):
            raise error(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def iter_json_list(path: str | Path, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[Any]:
    """The items of a file holding one JSON list, parsed item by item so each can be sized.

    An item over `max_record_bytes` (UTF-8 bytes of its JSON text) is an InputError naming its
    line and position, as is anything that is not a JSON list.
    """
    path = Path(path)
    text = read_text(path)
    what = "expected a JSON list of objects (Alpaca format)"
    i = _WS.match(text).end()
    if not text.startswith("[", i):
        data = _loads(path, text.count("\n", 0, i) + 1, text, InputError, what)
        raise InputError(f"{path}: {what}, got {type(data).__name__}")
    decoder = json.JSONDecoder()
    check_surrogates = _SURROGATE_ESCAPE.search(text) is not None

    def line_at(pos: int) -> int:  # only for a message: counting every item's line costs O(n^2)
        return text.count("\n", 0, pos) + 1

    i = _WS.match(text, i + 1).end()
    k = 0
    empty = text.startswith("]", i)
    while not empty:
        k += 1
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); {what}") from None
        except (ValueError, RecursionError) as e:
            raise InputError(f"{path}:{line_at(i)}: not valid JSON (item {k}: {str(e)[:100]}); {what}") from None
        if end - i > max_record_bytes // 4 and (n := len(text[i:end].encode("utf-8"))) > max_record_bytes:
            raise InputError(f"{path}:{line_at(i)}: record too long (item {k}: {n:,} bytes > "
                             f"{max_record_bytes:,}; {_LIMIT_HINT})")
        if check_surrogates and not _encodable(obj):
            _check_encodable(path, line_at(i), obj, InputError)
        yield obj
        i = _WS.match(text, end).end()
        if text.startswith(",", i):
            i = _WS.match(text, i + 1).end()
        elif text.startswith("]", i):
            break
        elif i >= len(text):
            raise InputError(f"{path}:{line_at(i)}: the list is not closed with ']'; {what}")
        else:
            raise InputError(f"{path}:{line_at(i)}: expected ',' or ']' after item {k}; {what}")
    i = _WS.match(text, i + 1).end()
    if i < len(text):
        raise InputError(f"{path}:{line_at(i)}: extra data after the list; {what}")


def _text(path: Path, line: int, obj: dict[str, Any], name: str, required: bool) -> str:
    if name not in obj or obj[name] is None:
        if required:
            raise InputError(
                f"{path}:{line}: missing field {name!r} (fields present: {sorted(obj)}); "
                "name the right field with --instruction-field/--input-field/--output-field "
                "or pick --format"
            )
        return ""
    v = obj[name]
    if not isinstance(v, str):
        raise InputError(f"{path}:{line}: field {name!r} must be a string, got {type(v).__name__}")
    return v


def _named_record(path: Path, line: int, obj: dict[str, Any], fields: tuple[str, str, str]) -> Record:
    """A record from an object with the instruction, input and output under `fields`."""
    instruction, inp, output = fields
    return Record(
        _text(path, line, obj, instruction, True),
        _text(path, line, obj, inp, False),
        _text(path, line, obj, output, True),
        obj,
        line,
        parse_score_text(obj.get("score")),
    )


def _detect(path: Path, max_record_bytes: int) -> str:
    """The format of `path` from its first bytes (a JSON list) or its first non-blank line."""
    with _open(path, InputError) as f:
        try:
            head = f.peek(_SNIFF_BYTES)[:_SNIFF_BYTES]
        except OSError as e:
            raise InputError(f"{path}: cannot read ({e.strerror})") from None
    why = _binary_reason(head)
    if why:
        raise InputError(f"{path}: {why}")
    if head.removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"["):
        return "alpaca"  # decided before reading a line: a one-line JSON list may exceed the record limit
    for lineno, line in iter_lines(path, InputError, max_record_bytes):
        if line.strip():
            obj = _loads(path, lineno, line, InputError, "expected an Alpaca JSON list or JSONL")
            if isinstance(obj, dict) and isinstance(obj.get("data"), list):
                return "authors"
            return "jsonl"
    raise InputError(f"{path}: the file is empty")


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
    if fmt == "auto":
        fmt = _detect(path, max_record_bytes)
    report = LoadReport(path=path, format=fmt)
    records: list[Record] = []
    if fmt == "alpaca":
        for i, obj in enumerate(iter_json_list(path, max_record_bytes), 1):
            if not isinstance(obj, dict):
                raise InputError(f"{path}: item {i} is not an object")
            records.append(_named_record(path, i, obj, (instruction_field, input_field, output_field)))
    elif fmt == "authors":
        for lineno, obj in iter_jsonl(path, InputError, max_record_bytes):
            d = obj.get("data")
            if not (isinstance(d, list) and len(d) == 2 and all(isinstance(x, str) for x in d)):
                raise InputError(
                    f"{path}:{lineno}: field 'data' must be a list of two strings [prompt, output] "
                    "(authors' format); use --format jsonl for other JSONL files"
                )
            instruction, _, inp = d[0].partition("\n")
            records.append(Record(instruction, inp, d[1], obj, lineno, parse_score_text(obj.get("score"))))
    else:
        for lineno, obj in iter_jsonl(path, InputError, max_record_bytes):
            records.append(_named_record(path, lineno, obj, (instruction_field, input_field, output_field)))
    if not records:
        raise InputError(f"{path}: no records found")
    report.n = len(records)
    report.empty_output_lines = [r.line for r in records if not r.output.strip()]
    return records, report


@dataclass
class AnswerRow:
    """One model answer to one test question."""

    test_set: str
    id: str
    instruction: str
    input: str
    output: str
    line: int


def load_answers(
    path: str | Path, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
) -> dict[tuple[str, str], AnswerRow]:
    """Answers keyed by (test_set, id); a duplicate or malformed row or a bad byte is an InputError naming it."""
    path = Path(path)
    rows: dict[tuple[str, str], AnswerRow] = {}
    for lineno, obj in iter_jsonl(path, InputError, max_record_bytes):
        for name in ("test_set", "id", "instruction", "output"):
            if name not in obj or obj[name] is None:
                raise InputError(
                    f"{path}:{lineno}: missing field {name!r}; answer files need "
                    "{test_set, id, instruction, input, output} on every line"
                )
        key = (str(obj["test_set"]), str(obj["id"]))
        if key in rows:
            raise InputError(
                f"{path}:{lineno}: duplicate (test_set, id) = {key}, first on line "
                f"{rows[key].line}; each question must appear once"
            )
        for name in ("instruction", "input", "output"):
            if obj.get(name) is not None and not isinstance(obj[name], str):
                raise InputError(f"{path}:{lineno}: field {name!r} must be a string")
        rows[key] = AnswerRow(key[0], key[1], obj["instruction"], obj.get("input") or "", obj["output"], lineno)
    if not rows:
        raise InputError(f"{path}: no answers found")
    return rows
