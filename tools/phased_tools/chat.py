"""What a chat request is, and the three ways one can go wrong (each handled differently)."""

from __future__ import annotations

Messages = list[dict[str, str]]


class FatalError(RuntimeError):
    """An error no retry can fix (bad key, unknown model); the whole run stops."""


class RequestFailed(RuntimeError):
    """One request failed for good (retries exhausted or a 400); the item is recorded as failed."""


class ParseError(ValueError):
    """A reply that does not have the expected shape; the item is re-asked."""
