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

Every record is validated: bad JSON, a missing or non-string field, an empty instruction or
output, a non-numeric score or one outside [1, 5], a duplicate id. With `on_invalid="error"`
the first one raises a DataError naming file and line; with `"skip"` it is left out and listed
in an `InvalidReport` (counts by reason), which the caller prints and writes to the run's
output directory. Nothing is dropped silently. A syntax error inside a JSON list is always an
error: the rest of the list cannot be located.

Files are read as bytes, JSONL line by line, so a bad byte or a huge line spoils only its own
record: a line that is not UTF-8 (`not_utf8`), or longer than `data.max_record_bytes`
(`too_long`, refused unread: tokenising one 50 MB line took 10 GB), is a bad record like the
others. A file with a NUL byte in its first block is binary: one error naming it.

A file is scored when its first record has a score field; then every record must have one.
Unscored records (plain Alpaca) get `score=None` and can only be trained one-off.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from phased_jax.errors import DataError
from phased_jax.fileio import write_text_atomic

FORMATS = ("auto", "alpaca", "authors", "scored", "jsonl", "hf")
SCORE_RANGE = (1.0, 5.0)
DEFAULT_FIELDS = {"instruction": "instruction", "input": "input", "output": "output",
                  "score": "score", "id": "id"}
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


class _Invalid(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def parse_score(value: Any) -> float:
    """A score as released ("4", "4.25\\n\\n", 3.5) -> float in [1, 5], else _Invalid."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _Invalid("bad_score", f"score {value!r} is not a number")
    try:
        score = float(value.strip()) if isinstance(value, str) else float(value)
    except ValueError:
        raise _Invalid("bad_score", f"score {value!r} is not a number") from None
    if not SCORE_RANGE[0] <= score <= SCORE_RANGE[1]:  # also rejects nan
        raise _Invalid("score_out_of_range", f"score {score} outside [1, 5]")
    return score


def _text(obj: Mapping[str, Any], name: str, what: str) -> str:
    if name not in obj:
        raise _Invalid("missing_field", f"missing field {name!r} ({what})")
    value = obj[name]
    if not isinstance(value, str):
        raise _Invalid("bad_type", f"field {name!r} is {type(value).__name__}, expected a string")
    return value


def _to_record(obj: Any, fields: Mapping[str, str], fmt: str, default_id: str, source: str,
               scored: bool) -> Record:
    """Validate one parsed row; `scored` says whether this file's rows carry scores."""
    if not isinstance(obj, dict):
        raise _Invalid("malformed", f"expected a JSON object, got {type(obj).__name__}")
    authors = fmt == "authors" or (fmt in ("auto", "scored") and isinstance(obj.get("data"), list)
                                   and fields["instruction"] not in obj)
    if authors:
        data = obj.get("data")
        if not (isinstance(data, list) and len(data) == 2 and all(isinstance(d, str) for d in data)):
            raise _Invalid("missing_field", "field 'data' must be [prompt, output] strings")
        instruction, _, input_ = data[0].partition("\n")
        output = data[1]
        score_name, id_name = "score", "id"
    else:
        instruction = _text(obj, fields["instruction"], "instruction")
        input_ = _text(obj, fields["input"], "input") if fields["input"] else ""
        output = _text(obj, fields["output"], "output")
        score_name, id_name = fields["score"], fields["id"]
    if not instruction.strip():
        raise _Invalid("empty_instruction", "empty instruction")
    if not output.strip():
        raise _Invalid("empty_output", "empty output")
    score = None
    if scored:
        if not score_name or score_name not in obj:
            raise _Invalid("missing_field", f"missing field {score_name!r} (score)")
        score = parse_score(obj[score_name])
    rid = obj.get(id_name, default_id) if id_name else default_id
    if not isinstance(rid, str | int) or isinstance(rid, bool):
        raise _Invalid("bad_type", f"id {rid!r} is not a string or integer")
    return Record(str(rid), instruction, input_, output, score, source)


def _json_list_items(path: Path, text: str) -> Iterator[tuple[int, int, int, Any]]:
    """(line, start, end, element) of a JSON list, so every element can be named by its line."""
    dec = json.JSONDecoder()
    ws = " \t\r\n"
    i, line, counted = 0, 1, 0

    def skip(i: int) -> int:
        while i < len(text) and text[i] in ws:
            i += 1
        return i

    def fail(pos: int, msg: str):
        ln = text.count("\n", 0, pos) + 1
        bad = _NOT_UTF8.match(text, pos)  # a bad byte outside the strings breaks the list
        if bad:
            msg = f"not UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x})"
        return DataError(f"{path}:{ln}: {msg}; a JSON list must be valid as a whole "
                         "(fix the file or convert it to JSONL, where bad lines can be skipped)")

    i = skip(i)
    if text[i:i + 1] != "[":
        raise fail(i, "expected a JSON list")
    i = skip(i + 1)
    if text[i:i + 1] == "]":
        return
    while True:
        line += text.count("\n", counted, i)
        counted = i
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise fail(e.pos, f"malformed JSON ({e.msg})") from None
        yield line, i, end, obj
        i = skip(end)
        if text[i:i + 1] == ",":
            i = skip(i + 1)
        elif text[i:i + 1] == "]":
            return
        else:
            raise fail(i, "expected ',' or ']' in the JSON list")


# Bytes that are not UTF-8 decode (errors="surrogateescape") to U+DC80..U+DCFF, which valid
# UTF-8 never yields: a record holding one is a bad record, not a crash of the whole file.
_NOT_UTF8 = re.compile("[\udc80-\udcff]")
_BINARY_PROBE = 8192  # bytes read to tell text from a binary file (a NUL byte among them)
_BOM = b"\xef\xbb\xbf"


def _too_long(n: int, limit: int) -> _Invalid:
    return _Invalid("too_long", f"record too long ({n} bytes > data.max_record_bytes={limit})")


def _not_utf8(raw: bytes, e: UnicodeDecodeError) -> _Invalid:
    return _Invalid("not_utf8", f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")


def _rows_of_json_list(path: Path, data: bytes, limit: int) -> Iterator[tuple[str, Any]]:
    text = data.decode("utf-8", errors="surrogateescape")
    for line, start, end, obj in _json_list_items(path, text):
        bad = _NOT_UTF8.search(text, start, end)
        if bad:
            obj = _Invalid("not_utf8", f"not UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x})")
        elif (end - start) * 4 > limit:  # a char is at most 4 bytes: count only when it may matter
            n = len(text[start:end].encode("utf-8", errors="surrogateescape"))
            if n > limit:
                obj = _too_long(n, limit)
        yield f"{path}:{line}", obj


def _rows_of_jsonl(path: Path, f: BinaryIO, limit: int) -> Iterator[tuple[str, Any]]:
    """Line by line, never holding more than `limit` bytes of one line: a huge line is counted
    and refused unread, and a bad byte spoils only its own line."""
    line = 0
    while True:
        raw = f.readline(limit + 2)  # + room for the line's own "\r\n"
        if not raw:
            return
        line += 1
        source = f"{path}:{line}"
        if len(raw) == limit + 2 and not raw.endswith(b"\n"):  # longer still: skip the rest
            n, chunk = len(raw), raw
            while not chunk.endswith(b"\n") and (chunk := f.readline(1 << 20)):
                n += len(chunk)
            n -= 2 if chunk.endswith(b"\r\n") else 1 if chunk.endswith(b"\n") else 0
            yield source, _too_long(n, limit)
            continue
        body = raw.rstrip(b"\r\n")
        if len(body) > limit:
            yield source, _too_long(len(body), limit)
            continue
        if not body.strip():
            continue
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            yield source, _not_utf8(body, e)
            continue
        try:
            yield source, json.loads(text)
        except json.JSONDecodeError as e:
            yield source, _Invalid("malformed", f"malformed JSON ({e.msg})")


def _rows_of_file(path: Path, limit: int) -> Iterator[tuple[str, Any]]:
    """(source, parsed object or _Invalid) for each row of a JSON list or JSONL file."""
    with open(path, "rb") as f:
        head = f.read(_BINARY_PROBE)
        nul = head.find(b"\0")
        if nul >= 0:
            raise DataError(f"{path}: a binary file (NUL byte at offset {nul}), "
                            "not JSON or JSONL text; check data.paths (convert UTF-16 text to "
                            "UTF-8)")
        start = len(_BOM) if head.startswith(_BOM) else 0
        f.seek(start)
        if head[start:].lstrip().startswith(b"["):
            yield from _rows_of_json_list(path, f.read(), limit)
        else:
            yield from _rows_of_jsonl(path, f, limit)


def _text_bytes(obj: Any, limit: int) -> int:
    """UTF-8 size of a parsed row's strings (top level and in lists), an HF row's length;
    exact when it may exceed `limit`, else the character count (encoding every row is slow)."""
    values = obj.values() if isinstance(obj, dict) else ()
    strings = [s for v in values for s in (v if isinstance(v, list) else [v]) if isinstance(s, str)]
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
        raise DataError(f"{name}: cannot load Hugging Face dataset ({type(e).__name__}: {e})") from e
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


@functools.cache
def _default_max_record_bytes() -> int:
    from phased_jax.config import get_default_config  # the number lives in the config defaults

    return int(get_default_config().data.max_record_bytes)


def read_records(paths: str | Sequence[str], format: str = "auto",
                 fields: Mapping[str, str] | None = None, on_invalid: str = "error",
                 hf_split: str = "train", max_record_bytes: int | None = None
                 ) -> tuple[list[Record], InvalidReport]:
    """Read and validate every record of `paths`; see the module docstring for the rules.

    `max_record_bytes` (None: the config default `data.max_record_bytes`) bounds one record.
    """
    limit = _default_max_record_bytes() if max_record_bytes is None else int(max_record_bytes)
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
        for n, (source, obj) in enumerate(rows):
            report.read += 1
            try:
                if isinstance(obj, _Invalid):
                    raise obj
                if scored is None and isinstance(obj, dict):  # decided by the file's first row
                    scored = (fields["score"] in obj) or ("score" in obj and "data" in obj)
                rec = _to_record(obj, fields, format, f"{stem}:{n}", source, bool(scored))
                if rec.id in seen:
                    raise _Invalid("duplicate_id", f"duplicate id {rec.id!r} (first at {seen[rec.id]})")
            except _Invalid as e:
                if on_invalid == "error":
                    raise DataError(f"{source}: {e.message} [{e.reason}]; fix the record or set "
                                    "--config.data.on_invalid=skip to skip and report it") from None
                report.add(source, e.reason, e.message)
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
