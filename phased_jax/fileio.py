"""Files, written whole or not at all and read line by line: the project's one file I/O layer.

Writing: a file is written beside its target under a unique temp name, synced, then renamed in
(and the rename synced), so a reader sees the old file or the new one, never half of one; on any
error the temp is removed. Directories (checkpoints, exports) go through `atomic_dir`.

Reading: bad bytes are bad input, never a crash. Files are read as bytes, JSONL one line at a
time and decoded strictly, so a non-UTF-8 byte names its line; a line longer than
`max_record_bytes` is refused unread (one runaway line cannot fill memory); a file that is
binary, compressed or UTF-16 is recognised by its first block. Problems come back either as a
`BadRecord` of their own line (for callers that skip bad records) or as one `FILE:LINE: ...`
error line. Logs may end in a line a kill tore: `iter_jsonl(on_torn_tail=...)` skips it.

JAX-free (standard library only): the tools import it.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

DEFAULT_MAX_RECORD_BYTES = 1 << 20
SNIFF_BYTES = 8192  # the first block, read to tell text from a binary file
UTF8_HINT = "the file must be UTF-8; convert it, e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8"
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
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


# --- writing --------------------------------------------------------------------------------

def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` beside `path`, fsync, rename it over `path`, fsync the folder. The temp
    name is unique per process and host; no temp is left behind on any error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(fd, "wb", closefd=True) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # the rename itself durable (not possible on every OS)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    """`write_bytes_atomic` of `text` in UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_jsonl_atomic(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """One JSON object a line (UTF-8 kept readable), written whole."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def output_problem(path: str | Path, *, folder: bool = False) -> str | None:
    """Why `path` (a file, or with `folder` a folder a run fills) cannot be written, or None.

    For a check before work that costs money or hours: finding out after it is the failure this
    prevents. A missing parent is not created: it is more often a typo.
    """
    path = Path(path)
    if folder:
        if path.exists() and not path.is_dir():
            return f"{path} exists and is not a folder; give a folder for the outputs"
        where = path if path.is_dir() else path.parent
    else:
        if path.is_dir():
            return f"{path} is a folder; give a file path, e.g. {path / 'scored.jsonl'}"
        if path.exists() and not path.is_file():
            return f"{path} exists and is not a regular file; give a file path"
        where = path.parent
    if not where.is_dir():
        return f"folder {where} does not exist; create it first (mkdir -p {where}) or give another path"
    try:  # the only reliable test (root, read-only mounts, ACLs): make a file there
        fd, probe = tempfile.mkstemp(prefix=".phased-write-test.", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"cannot write in {where} ({e.strerror})"
    return None


# --- reading --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Binary:
    """Why a file is not UTF-8 text at all: `why` says what it is and what to do; `nul_at` is
    the offset of the first NUL byte of its first block, if it has one."""

    why: str
    nul_at: int | None


@dataclass(frozen=True)
class BadRecord:
    """A record (a JSONL line, an item of a JSON list) that is not readable, at `line`.

    `reason`: `not_utf8`, `too_long` or `malformed`; `message` says why, without the place;
    `size` is a too-long record's bytes, `item` its position in a JSON list (0 in JSONL).
    `ended` is False for a last line with no line end: what a kill mid-write leaves.
    """

    line: int
    reason: str
    message: str
    size: int = 0
    item: int = 0
    ended: bool = True


def sniff_binary(head: bytes) -> Binary | None:
    """Whether a file whose first block is `head` is binary, compressed or UTF-16/32."""
    nul = head.find(b"\0")
    nul_at = nul if nul >= 0 else None
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return Binary(what, nul_at)
    if nul_at is not None:
        return Binary("a binary file (NUL bytes in its first block), not UTF-8 text; give the "
                      "JSON/JSONL data file", nul_at)
    bad = len(head) - len(head.decode("utf-8", "ignore").encode("utf-8"))
    if len(head) >= 64 and bad * 4 > len(head):
        return Binary(f"a binary file ({bad} of its first {len(head)} bytes are not UTF-8), not "
                      "text; give the JSON/JSONL data file", None)
    return None


def open_bytes(path: str | Path, error: type[Exception] = ValueError) -> BinaryIO:
    """`path` opened for reading bytes; a folder, a missing or unreadable file is one `error`."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{path}: is a folder; give a data file")
    try:
        return open(path, "rb", buffering=SNIFF_BYTES)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None


def read_head(path: str | Path, error: type[Exception] = ValueError) -> bytes:
    """The first block of `path` (for `sniff_binary` and format detection)."""
    with open_bytes(path, error) as f:
        try:
            return f.read(SNIFF_BYTES)
        except OSError as e:
            raise error(f"{path}: cannot read ({e.strerror})") from None


def _not_utf8(raw: bytes, e: UnicodeDecodeError, column: int) -> str:
    return f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {column})"


def read_text(path: str | Path, error: type[Exception] = ValueError) -> str:
    """The whole file decoded strictly (a JSON list, a template); errors name file:line."""
    path = Path(path)
    with open_bytes(path, error) as f:
        try:
            data = f.read()
        except OSError as e:
            raise error(f"{path}: cannot read ({e.strerror})") from None
    if binary := sniff_binary(data[:SNIFF_BYTES]):
        raise error(f"{path}: {binary.why}")
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise error(f"{path}:{line}: {_not_utf8(data, e, column)}; {UTF8_HINT}") from None


def _lines(f: BinaryIO, max_record_bytes: int) -> Iterator[tuple[int, str | BadRecord, bool]]:
    """(line, text without its line end or a BadRecord, whether it ended) of each line of `f`,
    never holding more than `max_record_bytes` of one: a longer line is counted, not kept."""
    lineno = 0
    while raw := f.readline(max_record_bytes + 2):  # + room for the line's own "\r\n"
        lineno += 1
        if lineno == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)
        ended = raw.endswith(b"\n")
        size = len(raw) - ended - raw.endswith(b"\r\n")
        if size > max_record_bytes:
            while not ended and (more := f.readline(1 << 20)):
                ended = more.endswith(b"\n")
                size += len(more) - ended - more.endswith(b"\r\n")
            yield lineno, BadRecord(lineno, "too_long", f"record too long ({size:,} bytes > "
                                    f"{max_record_bytes:,})", size), ended
            continue
        try:
            text: str | BadRecord = raw[:size].decode("utf-8")
        except UnicodeDecodeError as e:
            text = BadRecord(lineno, "not_utf8", _not_utf8(raw, e, e.start + 1), ended=ended)
        yield lineno, text, ended


def encodable(obj: Any) -> bool:
    """Whether `obj` can be written as UTF-8 JSON (json.loads accepts lone surrogate escapes)."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


LONE_SURROGATE = ("a \\u escape encodes half of a UTF-16 surrogate pair, which is not text; fix "
                  "or remove that escape")


def parse_json_object(text: str, line: int, ended: bool = True) -> dict[str, Any] | BadRecord:
    """One JSONL line's object, or a `malformed` BadRecord (bad JSON, deep nesting, giant
    numbers, lone surrogates, not an object)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        why = f"not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object"
        return BadRecord(line, "malformed", why, ended=ended)
    except (ValueError, RecursionError) as e:
        why = f"not valid JSON ({str(e)[:100] or type(e).__name__}); each line must be one JSON object"
        return BadRecord(line, "malformed", why, ended=ended)
    if not isinstance(obj, dict):
        return BadRecord(line, "malformed", f"expected a JSON object, got {type(obj).__name__}",
                         ended=ended)
    if SURROGATE_ESCAPE.search(text) and not encodable(obj):
        return BadRecord(line, "malformed", LONE_SURROGATE, ended=ended)
    return obj


def jsonl_records(path: str | Path, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
                  error: type[Exception] = ValueError) -> Iterator[tuple[int, dict | BadRecord]]:
    """(line, object or BadRecord) of each non-blank line: a bad line spoils only itself."""
    path = Path(path)
    with open_bytes(path, error) as f:
        try:
            for lineno, text, ended in _lines(f, max_record_bytes):
                if isinstance(text, BadRecord):
                    yield lineno, text
                elif text.strip():
                    yield lineno, parse_json_object(text, lineno, ended)
        except OSError as e:
            raise error(f"{path}: cannot read ({e.strerror})") from None


def describe(bad: BadRecord, max_record_bytes: int, limit_hint: str = "") -> str:
    """`bad` as the words of a one-line error (no place): what is wrong and what to do;
    `limit_hint` says how to raise the limit where the caller has a knob for it."""
    if bad.reason == "too_long":
        item = f"item {bad.item}: " if bad.item else ""
        hint = f"; {limit_hint}" if limit_hint else ""
        return f"record too long ({item}{bad.size:,} bytes > {max_record_bytes:,}{hint})"
    if bad.reason == "not_utf8":
        return f"{bad.message}; {UTF8_HINT}"
    return bad.message


def iter_jsonl(path: str | Path, error: type[Exception] = ValueError,
               max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES, *, limit_hint: str = "",
               on_torn_tail: Callable[[], None] | None = None
               ) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, object) of each non-blank line; anything else raises `error` as `FILE:LINE: ...`.

    With `on_torn_tail`, an unreadable last line with no line end (a kill mid-write: logs) is
    skipped and reported to it instead.
    """
    path = Path(path)
    if binary := sniff_binary(read_head(path, error)):
        raise error(f"{path}: {binary.why}")
    for lineno, obj in jsonl_records(path, max_record_bytes, error):
        if isinstance(obj, BadRecord):
            if on_torn_tail is not None and not obj.ended:
                on_torn_tail()
                continue
            raise error(f"{path}:{lineno}: {describe(obj, max_record_bytes, limit_hint)}")
        yield lineno, obj


def read_jsonl(path: str | Path, error: type[Exception] = ValueError) -> list[dict[str, Any]]:
    """All objects of a JSONL file (blank lines skipped); errors name file:line."""
    return [obj for _, obj in iter_jsonl(path, error)]
