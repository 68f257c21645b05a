"""Failed writes (and reads) as one line a user can act on.

A full disk is named with the output's size and the space left, however deep Orbax or
tensorstore wrapped it; while a save runs, the tracebacks its writer threads echo for the same
failure are dropped, so the one error the caller raises is all a user sees. After a
multi-process write, `raise_agreed` raises the error every process agreed on.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from phased_jax.errors import CheckpointError, exception_chain

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How tensorstore/Orbax and others spell ENOSPC/EDQUOT inside wrapped messages.
_DISK_FULL_TEXT = re.compile(
    r"no space left on device|disk quota exceeded|\bENOSPC\b|\bEDQUOT\b"
    r"|os_error_code='?(28|122)\b", re.IGNORECASE)


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
