"""Read instruction records from any supported source and validate every one of them.

Formats (`data.format`; `auto` decides per file and, for JSONL, per line):
- `alpaca`: a JSON list of `{"instruction", "input", "output"}` (Stanford Alpaca), no scores.
- `authors`: JSONL `{"id", "score", "data": ["<instruction>\\n<input>", "<output>"]}` (the Phased
  IFT release). The prompt's first line is the instruction, the rest the input; the score is a
  string that may carry trailing newlines.
- `scored`: `phased-score` output: each input row (Alpaca- or authors-shaped) kept whole plus
  `score` (float), `score_raw` and `scorer`. Like `jsonl`, but every row must have a score.
- `jsonl`: JSONL (or a JSON list) with the field names of `data.fields`.
- `hf`: a Hugging Face dataset: a `save_to_disk` directory, or a name / local path for
  `datasets.load_dataset` (split `data.hf_split`), fields by `data.fields`.
- `messages` / `sharegpt`: conversations (`phased_jax.formats`), in JSONL, a JSON list or an HF
  dataset; the list field is `data.fields.messages` / `data.fields.conversations`. `auto` (and
  `scored`, `jsonl`, `hf`) take a row holding that field as a conversation. A conversation must
  end with an assistant turn; one file holds one shape: a row of the other shape (an Alpaca row
  among conversations, or the reverse) is a bad record (`mixed_shapes`) named by its line.

Every record is validated: bad JSON, a missing or non-string field, an empty instruction or
output, a non-numeric score or one outside [1, 5], a duplicate id. With `on_invalid="error"`
the first one raises a DataError naming file and line; with `"skip"` it is left out and listed
in an `InvalidReport` (counts by reason), which the caller prints and writes to the run's
output directory. Nothing is dropped silently. A syntax error inside a JSON list is always an
error: the rest of the list cannot be located.

Rows are read by `phased_jax.formats` (the parser `phased-score` shares), which returns bad
bytes, huge lines and bad JSON as bad records of their own: a line that is not UTF-8
(`not_utf8`), or longer than `data.max_record_bytes` (`too_long`, refused unread: tokenising one
50 MB line took 10 GB), is a bad record like the others. This module adds what training
requires: no empty instruction or output (`phased-score` keeps those), scores in [1, 5], unique
ids. A binary file (a NUL byte in its first block, or compressed) is one error naming it.

A file is scored when its first record has a score field; then every record must have one.
Unscored records (plain Alpaca) get `score=None` and can only be trained one-off.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phased_jax.config import get_default_config
from phased_jax.errors import DataError
from phased_jax.fileio import BadRecord, read_head, sniff_binary, write_text_atomic
from phased_jax.formats import (
    DEFAULT_FIELDS,
    MISSING,
    ListError,
    RowError,
    Turn,
    check_shape,
    conversation_style,
    exchange,
    file_records,
    parse_score_text,
    row_fields,
)
from phased_jax.local_paths import hub_load_error

FORMATS = ("auto", "alpaca", "authors", "scored", "jsonl", "hf", "messages", "sharegpt")
SCORE_RANGE = (1.0, 5.0)
_JSON_SUFFIXES = (".json", ".jsonl")


@dataclass(frozen=True)
class Record:
    """One validated example. `source` is `file:line` (or `dataset[split]:row`) for messages."""

    id: str
    instruction: str
    input: str
    output: str
    score: float | None
    source: str
    # A conversation's turns (its instruction/output are the first exchange); () single-turn.
    messages: tuple[Turn, ...] = ()

    @property
    def turns(self) -> tuple[Turn, ...]:
        """The record as a conversation: its turns, or a single-turn record's one exchange."""
        return self.messages or exchange(self.instruction, self.input, self.output)


def hash_records(h: Any, records: Iterable[Record]) -> None:
    """Feed every record's content (a conversation's turns too) to hash `h`: the one digest
    of what the token cache and `phased-jax score`'s chunks were computed from."""
    for r in records:
        h.update("\0".join((r.id, r.instruction, r.input, r.output, "\1")).encode())
        for t in r.messages:
            h.update(f"{t.role}\2{t.content}\3".encode())


@dataclass
class InvalidReport:
    """Records left out under `on_invalid="skip"`, each with its place and reason."""

    skipped: list[dict[str, str]] = field(default_factory=list)
    read: int = 0  # rows seen, valid or not

    @property
    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(s["reason"] for s in self.skipped).items()))

    def add(self, source: str, reason: str, message: str) -> None:
        self.skipped.append({"source": source, "reason": reason, "message": message})

    def extend(self, other: InvalidReport) -> None:
        self.skipped += other.skipped
        self.read += other.read

    def to_dict(self) -> dict[str, Any]:
        return {"read": self.read, "kept": self.read - len(self.skipped),
                "skipped": len(self.skipped), "counts": self.counts, "records": self.skipped}

    def summary(self, limit: int = 5) -> str:
        if not self.skipped:
            return f"read {self.read} records, all valid"
        counts = ", ".join(f"{k}: {v}" for k, v in self.counts.items())
        lines = [f"read {self.read} records, skipped {len(self.skipped)} ({counts})"]
        lines += [f"  {s['source']}: {s['message']}" for s in self.skipped[:limit]]
        if len(self.skipped) > limit:
            lines.append(f"  ... and {len(self.skipped) - limit} more")
        return "\n".join(lines)

    def write(self, path: str | Path) -> Path:
        """Write the report as JSON atomically (rename), creating the directory."""
        path = Path(path)
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n")
        return path


def parse_score(value: Any) -> float:
    """A score as released ("4", "4.25\\n\\n", 3.5) -> float in [1, 5], else RowError."""
    score = parse_score_text(value)
    if score is None:
        raise RowError("bad_score", f"score {value!r} is not a number")
    if not SCORE_RANGE[0] <= score <= SCORE_RANGE[1]:  # also rejects nan
        raise RowError("score_out_of_range", f"score {score} outside [1, 5]")
    return score


def _to_record(obj: Any, fields: Mapping[str, str], fmt: str, default_id: str, source: str,
               scored: bool) -> Record:
    """Validate one parsed row; `scored` says whether this file's rows carry scores."""
    row = row_fields(obj, fields, fmt)
    if not row.instruction.strip():
        raise RowError("empty_instruction", "empty instruction")
    if not row.output.strip():
        raise RowError("empty_output", "empty output")
    score = None
    if scored:
        if row.score is MISSING:
            raise RowError("missing_field", f"missing field {row.score_field!r} (score)")
        score = parse_score(row.score)
    rid = default_id if row.id is MISSING else row.id
    if not isinstance(rid, str | int) or isinstance(rid, bool):
        raise RowError("bad_type", f"id {rid!r} is not a string or integer")
    return Record(str(rid), row.instruction, row.input, row.output, score, source, row.messages)


def _too_long(n: int, limit: int) -> RowError:
    return RowError("too_long", f"record too long ({n} bytes > data.max_record_bytes={limit})")


def _rows_of_file(path: Path, limit: int) -> Iterator[tuple[str, Any]]:
    """(source, parsed object or RowError) for each row of a JSON list or JSONL file."""
    binary = sniff_binary(read_head(path, DataError))
    if binary is not None:
        what = (binary.why if binary.nul_at is None else
                f"a binary file (NUL byte at offset {binary.nul_at}), not JSON or JSONL text")
        raise DataError(f"{path}: {what}; check data.paths (convert UTF-16 text to UTF-8)")
    try:
        for line, _, obj in file_records(path, limit, DataError):
            if isinstance(obj, BadRecord):
                obj = (_too_long(obj.size, limit) if obj.reason == "too_long"
                       else RowError(obj.reason, obj.message))
            yield f"{path}:{line}", obj
    except ListError as e:
        what = f"malformed JSON ({e.syntax})" if e.syntax else str(e)
        raise DataError(f"{path}:{e.line}: {what}; a JSON list must be valid as a whole (fix "
                        "the file or convert it to JSONL, where bad lines can be skipped)") from None


def _strings(value: Any) -> Iterator[str]:
    """Every string in a parsed value (a conversation's turns are dicts in a list)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict | list | tuple):
        for v in (value.values() if isinstance(value, dict) else value):
            yield from _strings(v)


def _text_bytes(obj: Any, limit: int) -> int:
    """UTF-8 size of a parsed row's strings (at any depth), an HF row's length; exact when it
    may exceed `limit`, else the character count (encoding every row is slow)."""
    strings = list(_strings(obj))
    chars = sum(map(len, strings))
    if chars * 4 <= limit:  # a character is at most 4 bytes
        return chars
    return sum(len(s.encode("utf-8", errors="surrogateescape")) for s in strings)


def _rows_of_hf(name: str, split: str, limit: int) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        p = Path(name)
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists()
                           or (p / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types; the message is what matters
        raise DataError(hub_load_error(name, e) or f"{name}: cannot load Hugging Face dataset "
                        f"({type(e).__name__}: {e})") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{name}: no split {split!r}; it has {sorted(ds)}")
        ds = ds[split]
    for row, obj in enumerate(ds):
        n = _text_bytes(obj, limit)
        yield f"{name}[{split}]:{row}", _too_long(n, limit) if n > limit else obj


def _expand(paths: Sequence[str], fmt: str) -> list[tuple[str, str]]:
    """(path or dataset name, kind) with directories of JSON files expanded in sorted order."""
    out = []
    for p in paths:
        path = Path(p)
        if fmt == "hf" or not path.exists():
            if fmt not in ("auto", "hf"):
                raise DataError(f"{p}: no such file (format {fmt!r})")
            out.append((p, "hf"))
        elif path.is_dir():
            if any((path / n).exists() for n in ("dataset_info.json", "state.json",
                                                 "dataset_dict.json")):
                out.append((p, "hf"))
                continue
            files = sorted(f for f in path.iterdir() if f.suffix in _JSON_SUFFIXES)
            if not files:
                raise DataError(f"{p}: directory holds no .json/.jsonl files")
            out += [(str(f), "file") for f in files]
        else:
            out.append((p, "file"))
    return out


def read_records(paths: str | Sequence[str], format: str = "auto",
                 fields: Mapping[str, str] | None = None, on_invalid: str = "error",
                 hf_split: str = "train", max_record_bytes: int | None = None
                 ) -> tuple[list[Record], InvalidReport]:
    """Read and validate every record of `paths`; see the module docstring for the rules.

    `max_record_bytes` (None: the config default `data.max_record_bytes`) bounds one record.
    """
    limit = int(get_default_config().data.max_record_bytes if max_record_bytes is None
                else max_record_bytes)
    if limit < 1:
        raise DataError(f"data.max_record_bytes must be >= 1, not {max_record_bytes}")
    if format not in FORMATS:
        raise DataError(f"unknown data.format {format!r}; choose one of {FORMATS}")
    if on_invalid not in ("error", "skip"):
        raise DataError(f"data.on_invalid must be 'error' or 'skip', not {on_invalid!r}")
    paths = (paths,) if isinstance(paths, str) else tuple(paths)
    if not paths:
        raise DataError("no data: set data.paths (files, directories or HF dataset names)")
    fields = {**DEFAULT_FIELDS, **(dict(fields) if fields else {})}
    report = InvalidReport()
    records: list[Record] = []
    seen: dict[str, str] = {}
    for name, kind in _expand(paths, format):
        rows: Iterable[tuple[str, Any]] = (_rows_of_hf(name, hf_split, limit) if kind == "hf"
                                           else _rows_of_file(Path(name), limit))
        stem = Path(name).stem if kind == "file" else name
        scored: bool | None = True if format in ("scored", "authors") else None
        if format == "alpaca":
            scored = False
        shape: tuple[bool, str] | None = None  # (conversation?, source) of the file's first row
        for n, (source, obj) in enumerate(rows):
            report.read += 1
            try:
                if isinstance(obj, RowError):
                    raise obj
                if scored is None and isinstance(obj, dict):  # decided by the file's first row
                    scored = (fields["score"] in obj) or ("score" in obj and "data" in obj)
                if isinstance(obj, dict):
                    talk = conversation_style(obj, fields, format) is not None
                    shape = shape or (talk, source)
                    check_shape(talk, *shape)
                rec = _to_record(obj, fields, format, f"{stem}:{n}", source, bool(scored))
                if rec.id in seen:
                    raise RowError("duplicate_id", f"duplicate id {rec.id!r} (first at {seen[rec.id]})")
            except RowError as e:
                if on_invalid == "error":
                    raise DataError(f"{source}: {e} [{e.reason}]; fix the record or set "
                                    "--config.data.on_invalid=skip to skip and report it") from None
                report.add(source, e.reason, str(e))
                continue
            seen[rec.id] = source
            records.append(rec)
    if not records:
        raise DataError(f"no valid records in {', '.join(paths)}"
                        + (f" ({report.summary()})" if report.skipped else ""))
    return records, report


def read_config_records(data_cfg: Any) -> tuple[list[Record], InvalidReport]:
    """`read_records` with the fields of a config's `data` section."""
    fields = data_cfg.fields.to_dict() if hasattr(data_cfg.fields, "to_dict") else data_cfg.fields
    return read_records(tuple(data_cfg.paths), data_cfg.format, fields, data_cfg.on_invalid,
                        data_cfg.get("hf_split", "train"), data_cfg.get("max_record_bytes"))
