"""Directories that appear whole or not at all: checkpoints' params and Hugging Face exports.

Every directory we publish is written beside its target under a temp name
(`.NAME.tmp-XXXXXXXX`), synced, then renamed in; an existing target is renamed aside
(`.NAME.old-XXXXXXXX`) first and deleted only after the new one is in place. A run killed at any
point leaves either the old output or the new one under the target's name, plus at most a temp
that the next write to the same target recognises by its name and removes (or, for an `.old-`
whose target is missing, renames back). Nothing else is ever deleted. Single files go through
`phased_jax.fileio`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

from phased_jax.errors import CheckpointError
from phased_jax.io_errors import disk_full_error

MARKER = ".phased-jax-partial"  # inside a temp dir: who is writing it (host, pid)


def _temp_re(target: Path, kind: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(target.name)}\.{kind}-[0-9a-f]{{8}}")


def temp_path(target: Path, token: str | None = None) -> Path:
    """The temp name beside `target` that a write to it uses (`token`: 8 hex digits, shared by
    all processes of a multi-process write; default random)."""
    token = token or uuid.uuid4().hex[:8]
    if not re.fullmatch(r"[0-9a-f]{8}", token):
        raise ValueError(f"temp token must be 8 hex digits, got {token!r}")
    return target.with_name(f".{target.name}.tmp-{token}")


def make_temp_dir(target: Path, token: str | None = None) -> Path:
    """Create the temp dir for `target`, marked with this host and pid so that a later write
    can tell a killed attempt's leftover from a live one."""
    tmp = temp_path(target, token)
    tmp.mkdir(parents=True)
    (tmp / MARKER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    return tmp


def _alive_elsewhere(tmp: Path) -> bool:
    """Whether another live process on this host may still be writing `tmp`."""
    try:
        owner = json.loads((tmp / MARKER).read_text())
        host, pid = owner["host"], int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False  # killed before (or while) writing its marker
    if host != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def clean_leftovers(target: Path) -> list[Path]:
    """Remove what killed writes to `target` left beside it; returns what was removed.

    `.NAME.tmp-*` dirs are removed unless a live process on this host owns them. An
    `.NAME.old-*` is a previous output renamed aside: deleted if `target` exists (the swap
    finished), else renamed back to `target` (killed mid-swap: the old output is all we have).
    """
    target = Path(target).absolute()
    if not target.parent.is_dir():
        return []
    removed = []
    tmp_re, old_re = _temp_re(target, "tmp"), _temp_re(target, "old")
    olds = []
    for entry in sorted(target.parent.iterdir()):
        if tmp_re.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            if not _alive_elsewhere(entry):
                shutil.rmtree(entry)
                removed.append(entry)
        elif old_re.fullmatch(entry.name):
            olds.append(entry)
    if olds and not os.path.lexists(target):
        newest = max(olds, key=lambda p: p.lstat().st_mtime)
        os.rename(newest, target)
        olds.remove(newest)
    for old in olds:
        _remove(old)
        removed.append(old)
    return removed


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse to replace a non-empty `target` unless `overwrite`."""
    if (target.exists() and not (target.is_dir() and not any(target.iterdir()))
            and not overwrite):
        raise CheckpointError(f"{target}: already exists and is not empty; choose another "
                              "output or pass overwrite (CLI: --overwrite)")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(directory: Path) -> None:
    """fsync every file and directory under `directory`, so a rename publishes data that is on
    disk, not only in the page cache (a power cut after the rename must not leave holes)."""
    for root, _dirs, files in os.walk(directory):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def publish(tmp: Path, target: Path) -> None:
    """Move the complete `tmp` to `target`; an old `target` is deleted only once replaced."""
    (tmp / MARKER).unlink(missing_ok=True)
    sync_tree(tmp)
    if os.path.lexists(target):
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        _fsync(target.parent)
        _remove(old)
    else:
        os.rename(tmp, target)
    _fsync(target.parent)


def discard(tmp: Path) -> None:
    """Remove a temp dir of ours after a failed write (best effort: an error is already up)."""
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: Path, overwrite: bool = False,
                     needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a fresh temp dir beside `target`; on success it replaces `target` by rename.

    Readers never see a half-written output and an old one survives any failure: it is renamed
    aside only when the new one is complete. Leftovers of killed earlier writes are cleaned
    first. A disk-full failure becomes one CheckpointError line (with `needed_bytes` if given).
    Single-writer: in a multi-process run only one process may call it for a target.
    """
    target = Path(target).absolute()
    clean_leftovers(target)
    check_target(target, overwrite)
    replacing = target.exists()
    try:
        tmp = make_temp_dir(target)
    except OSError as e:
        if (err := disk_full_error(e, target, needed_bytes, replacing)) is not None:
            raise err from e
        raise
    try:
        yield tmp
        publish(tmp, target)
    except BaseException as e:
        discard(tmp)
        if (err := disk_full_error(e, target, needed_bytes, replacing)) is not None:
            raise err from e
        raise
