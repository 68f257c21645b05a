"""The project's errors: each message names the file, line or field at fault and what to do."""

from __future__ import annotations

from collections.abc import Iterator


class PhasedError(Exception):
    """Base of every error phased-jax raises on bad input; the CLI prints it without a traceback."""


class ConfigError(PhasedError):
    """A config field is missing, mistyped or inconsistent."""


class CheckpointError(PhasedError):
    """A checkpoint (HF or Orbax) is missing, unreadable or does not fit the model."""


class DataError(PhasedError):
    """An input record or data file is malformed."""


class UsageError(ConfigError):
    """The command line or its config file is wrong before any data is read (bad path, unknown
    field, invalid value): the CLI prints it on one line and exits 2, as argparse does."""


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
