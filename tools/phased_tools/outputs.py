"""Files written only once every answer is in: checked writable first, then written whole or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def output_problem(path: Path, *, folder: bool = False) -> str | None:
    """Why `path` (a file, or with `folder` a folder the run fills) cannot be written, or None.

    Checked before the first request is sent: finding out after paying for every answer is the
    failure this prevents. A missing parent is not created: it is more often a typo.
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` beside `path`, fsync, rename it over `path`, fsync the folder.

    The file appears whole or not at all, and no temporary file is left on any error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(fd, "wb", closefd=True) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself durable (not possible on every OS)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 twin of atomic_write_bytes."""
    atomic_write_bytes(path, text.encode("utf-8"))


def jsonl(rows: Sequence[dict[str, Any]]) -> str:
    """One JSON object a line, UTF-8 kept readable."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
