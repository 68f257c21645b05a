"""Staying under the server's limits: a requests/tokens-per-minute bucket and the server's Retry-After."""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from typing import Any

from phased_tools.chat import Messages


def estimate_tokens(messages: Messages) -> int:
    """Rough prompt token count (4 characters a token, plus per-message overhead), no tiktoken."""
    return sum(len(m["content"]) for m in messages) // 4 + 4 * len(messages) + 3


class TokenBucket:
    """A smooth limiter in the shape of OpenAI's: `per_minute` refilled continuously.

    The burst is a tenth of a second's worth, so the achieved rate never overshoots the limit
    over any window that matters. Waiters are served in order (the lock is FIFO).
    """

    def __init__(self, per_minute: float, burst_seconds: float = 0.1) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_seconds)
        self.level = self.capacity
        self.stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self, n: float = 1.0) -> None:
        """Take `n` units, waiting as long as needed; a request bigger than the burst waits for a full bucket."""
        async with self._lock:
            while True:
                now = time.monotonic()
                self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
                self.stamp = now
                need = min(n, self.capacity)
                if self.level >= need:
                    self.level -= n
                    return
                await asyncio.sleep((need - self.level) / self.rate)


def parse_retry_after(headers: Any) -> float | None:
    """Seconds the server asks us to wait: retry-after-ms, Retry-After seconds or HTTP date."""
    if headers is None:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            delay = float(value) / divisor
        except ValueError:
            continue
        if math.isfinite(delay) and delay >= 0:
            return delay
    value = headers.get("retry-after")
    if value:
        try:
            parsed = email.utils.parsedate_tz(value)
            if parsed is not None:
                return max(0.0, float(email.utils.mktime_tz(parsed) - time.time()))
        except (TypeError, ValueError, OverflowError):
            return None
    return None
