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
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("auto", "alpaca", "authors", "jsonl")


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


def _detect(path: Path, first: str) -> str:
    if first.lstrip().startswith("["):
        return "alpaca"
    try:
        obj = json.loads(first)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:1: not JSON ({e.msg}); expected an Alpaca JSON list or JSONL") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        return "authors"
    return "jsonl"


def iter_jsonl(path: str | Path, error: type[Exception] = InputError) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line; bad JSON raises `error` naming file:line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(
                    f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                    "each line must be one JSON object"
                ) from None
            if not isinstance(obj, dict):
                raise error(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


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


def load_records(
    path: str | Path,
    fmt: str = "auto",
    *,
    instruction_field: str = "instruction",
    input_field: str = "input",
    output_field: str = "output",
) -> tuple[list[Record], LoadReport]:
    """Read every record of `path`; raise InputError (file:line, what to do) on bad data."""
    path = Path(path)
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if fmt == "auto":
        with open(path, encoding="utf-8") as f:
            first = ""
            for line in f:
                if line.strip():
                    first = line
                    break
        if not first:
            raise InputError(f"{path}: the file is empty")
        fmt = _detect(path, first)
    report = LoadReport(path=path, format=fmt)
    records: list[Record] = []
    if fmt == "alpaca":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); expected a JSON list") from None
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of objects (Alpaca format), got {type(data).__name__}")
        for i, obj in enumerate(data, 1):
            if not isinstance(obj, dict):
                raise InputError(f"{path}: item {i} is not an object")
            records.append(_named_record(path, i, obj, (instruction_field, input_field, output_field)))
    elif fmt == "authors":
        for lineno, obj in iter_jsonl(path):
            d = obj.get("data")
            if not (isinstance(d, list) and len(d) == 2 and all(isinstance(x, str) for x in d)):
                raise InputError(
                    f"{path}:{lineno}: field 'data' must be a list of two strings [prompt, output] "
                    "(authors' format); use --format jsonl for other JSONL files"
                )
            instruction, _, inp = d[0].partition("\n")
            records.append(Record(instruction, inp, d[1], obj, lineno, parse_score_text(obj.get("score"))))
    else:
        for lineno, obj in iter_jsonl(path):
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


def load_answers(path: str | Path) -> dict[tuple[str, str], AnswerRow]:
    """Answers keyed by (test_set, id); a duplicate or malformed row is an InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    rows: dict[tuple[str, str], AnswerRow] = {}
    for lineno, obj in iter_jsonl(path):
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
