"""A process body for the concurrent-open test (its own module so child processes import little)."""

from __future__ import annotations

from typing import Any

from phased_tools.cache import AnswerCache, CachedAnswer


def open_store_read(path: str, i: int, barrier: Any, results: Any) -> None:
    """Wait for every sibling, then open the cache, store answer `i` and read it back.

    Puts (i, "ok") on `results`, or (i, the error) when any step fails.
    """
    try:
        barrier.wait(60)
        cache = AnswerCache(path)
        answer = CachedAnswer(f"answer {i}", "stop", i, 1)
        cache.put(f"key-{i}", "m", {"i": i}, answer)
        got = cache.get(f"key-{i}")
        cache.close()
        results.put((i, "ok" if got == answer else f"read back {got!r}"))
    except BaseException as e:  # reported to the test, which names the failure
        results.put((i, f"{type(e).__name__}: {e}"))
