"""Outputs that appear whole or not at all, and a disk-full error a user can act on.

Every directory we publish is written beside its target under a temp name
(`.NAME.tmp-XXXXXXXX`), synced, then renamed in; an existing target is renamed aside
(`.NAME.old-XXXXXXXX`) first and deleted only after the new one is in place. A run killed at any
point leaves either the old output or the new one under the target's name, plus at most a temp
that the next write to the same target recognises by its name and removes (or, for an `.old-`
whose target is missing, renames back). Nothing else is ever deleted.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from phased_jax.errors import CheckpointError

MARKER = ".phased-jax-partial"  # inside a temp dir: who is writing it (host, pid)
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How tensorstore/Orbax and others spell ENOSPC/EDQUOT inside wrapped messages.
_DISK_FULL_TEXT = re.compile(
    r"no space left on device|disk quota exceeded|\bENOSPC\b|\bEDQUOT\b"
    r"|os_error_code='?(28|122)\b", re.IGNORECASE)


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


def raise_agreed(error: BaseException | None, target: Path, elsewhere: str,
                 needed_bytes: int | None = None, replacing: bool = False) -> NoReturn:
    """After `distributed.all_ok` said a multi-process write failed: raise this process's own
    error (a full disk as one line), or, where this process did its part, `elsewhere` (which
    process failed at what)."""
    if error is None:
        raise CheckpointError(f"{target}: {elsewhere} (see its error); nothing was written")
    if (err := disk_full_error(error, target, needed_bytes, replacing)) is not None:
        raise err from error
    raise error


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file beside `path` (synced) and rename it in: readers see the old file or the new
    one, never half of one. The temp name is unique per process and host."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def discard(tmp: Path) -> None:
    """Remove a temp dir of ours after a failed write (best effort: an error is already up)."""
    shutil.rmtree(tmp, ignore_errors=True)


# --- disk full -----------------------------------------------------------------------------

def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and everything behind it: causes, contexts and the members of exception groups."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or anything in its cause/context chain (or group), says the disk is full:
    an OSError with ENOSPC/EDQUOT, or a wrapped message such as tensorstore's
    `RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']` (a ValueError)."""
    for e in exception_chain(exc):
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            return True
        if _DISK_FULL_TEXT.search(str(e)):
            return True
    return False


def human_bytes(n: float) -> str:
    """`n` bytes as '512 B', '1.5 MB', '140.2 GB' (powers of 1000, as `--max-shard-size`)."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} TB"


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def disk_full_error(exc: BaseException, path: str | Path, needed_bytes: int | None = None,
                    replacing: bool = False) -> CheckpointError | None:
    """A one-line CheckpointError for a disk-full `exc` while writing `path`, else None.

    Use as `if (err := disk_full_error(e, path, n)) is not None: raise err from e`. The line
    names the path, the bytes the output needs (when known) and what is free now (after the
    caller removed its partial output). `replacing`: an old output stays until the new one is
    complete, so both must fit. A CheckpointError `exc` already says what it means: None.
    """
    if isinstance(exc, CheckpointError) or not is_disk_full(exc):
        return None
    _Quiet.reported = True
    path = Path(path)
    parts = [f"{path}: no space left on device"]
    if needed_bytes:
        parts.append(f"the output needs about {human_bytes(needed_bytes)}")
    free = _free_bytes(path.parent)
    if free is not None:
        parts.append(f"{human_bytes(free)} is free there")
    msg = "; ".join(parts)
    if replacing:
        msg += " (the old output is kept until the new one is complete, so both must fit)"
    return CheckpointError(msg + "; nothing was changed. Free space or choose another output")


class _Quiet:
    """While a save runs (`depth`), or once a disk-full error was reported (`reported`), the
    echoes of it from background writer threads are dropped: the caller's one line says it."""

    depth = 0
    reported = False
    installed = False
    failed_read = False


def quiet_failed_read_echoes() -> None:
    """After a restore failed (and was reported), drop what its unfinished Orbax reads print
    when they are collected, for the rest of the process."""
    _Quiet.failed_read = True
    if not getattr(sys.unraisablehook, "phased_jax_quiet", False):
        sys.unraisablehook = _drop_closed_loop(sys.unraisablehook)


def _quiet_now() -> bool:
    return _Quiet.depth > 0 or _Quiet.reported


class _DropDiskFullRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not _quiet_now():
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and is_disk_full(exc):
            return False
        return not _DISK_FULL_TEXT.search(record.getMessage())


def _drop_closed_loop(hook: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def unraisable(u: Any) -> Any:
        # tensorstore completing writes after Orbax closed its event loop (it failed early)
        if (_quiet_now() and isinstance(u.exc_value, RuntimeError)
                and str(u.exc_value) == "Event loop is closed"):
            return None
        # Orbax read coroutines a failed restore left unfinished, collected later
        code = getattr(u.object, "cr_code", None)
        if _Quiet.failed_read and code is not None and "/orbax/" in code.co_filename:
            return None
        return hook(u)

    unraisable.phased_jax_quiet = True  # type: ignore[attr-defined]
    return unraisable


def _drop_closed_loop_prints(hook: Callable[..., Any]) -> Callable[..., Any]:
    """The same echoes, printed through `sys.excepthook` by tensorstore's callback threads."""
    def excepthook(kind: Any, value: Any, tb: Any) -> Any:
        if (_quiet_now() and isinstance(value, RuntimeError)
                and str(value) == "Event loop is closed"):
            return None
        return hook(kind, value, tb)

    excepthook.phased_jax_quiet = True  # type: ignore[attr-defined]
    return excepthook


@contextlib.contextmanager
def quiet_disk_full_noise() -> Iterator[None]:
    """Around an Orbax save: drop the tracebacks its writer threads log (absl, asyncio) for a
    disk-full error, and tensorstore's 'Event loop is closed' echoes of an early failure, so
    the one error the caller raises is all a user sees. Every other record passes. Stragglers
    that arrive after the save returned are dropped too once a disk-full error was reported.
    """
    if not _Quiet.installed:
        for name in ("absl", "asyncio"):
            logging.getLogger(name).addFilter(_DropDiskFullRecords())
        _Quiet.installed = True
    if not getattr(sys.unraisablehook, "phased_jax_quiet", False):
        sys.unraisablehook = _drop_closed_loop(sys.unraisablehook)
    if not getattr(sys.excepthook, "phased_jax_quiet", False):
        sys.excepthook = _drop_closed_loop_prints(sys.excepthook)
    _Quiet.depth += 1
    try:
        yield
    except BaseException as e:
        _Quiet.reported = _Quiet.reported or is_disk_full(e)
        raise
    finally:
        _Quiet.depth -= 1


# --- one directory, published atomically ---------------------------------------------------

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


def shared_token() -> str:
    """A random 8-hex-digit token, the same on every process (a collective in multi-process)."""
    import jax

    if jax.process_count() == 1:
        return uuid.uuid4().hex[:8]
    from jax.experimental import multihost_utils

    value = np.uint32(uuid.uuid4().int & 0xFFFFFFFF)
    return f"{int(multihost_utils.broadcast_one_to_all(value)):08x}"
