"""What a run cost and how it went: the counters, the end-of-run summary and the dry-run estimate."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from phased_tools.chat import Messages
from phased_tools.client_config import ClientConfig
from phased_tools.rate_limits import estimate_tokens


@dataclass
class Stats:
    """What a run cost and how it went, for the summary and the progress bar."""

    requests: int = 0
    answers: int = 0
    cache_hits: int = 0
    retries: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_sent: float | None = None  # monotonic time of the first request on the wire
    last_answer: float | None = None  # ... and of the last answer, the window --rpm governs

    def sending_window(self) -> float | None:
        """Seconds from the first request to the last answer (None before there are both)."""
        if self.first_sent is None or self.last_answer is None or self.last_answer <= self.first_sent:
            return None
        return self.last_answer - self.first_sent

    def cost(self, prices: tuple[float, float] | None) -> float | None:
        if prices is None:
            return None
        return (self.prompt_tokens * prices[0] + self.completion_tokens * prices[1]) / 1e6


def format_summary(stats: Stats, cfg: ClientConfig, counts: dict[str, int], wall: float) -> str:
    """The end-of-run report: outcomes, requests and retries, tokens, cost, wall time."""
    lines = [", ".join(f"{k} {v:,}" for k, v in counts.items())]
    retries = sum(stats.retries.values())
    detail = ", ".join(f"{k} x{v}" for k, v in sorted(stats.retries.items()))
    lines.append(
        f"requests sent {stats.requests:,} (answers {stats.answers:,}, retries {retries:,}"
        + (f": {detail}" if detail else "")
        + f"); cache hits {stats.cache_hits:,}"
    )
    prices = cfg.prices()
    cost = stats.cost(prices)
    price_note = (
        f"${cost:,.4f} ({cfg.model} at ${prices[0]:g}/${prices[1]:g} per 1M in/out)"
        if cost is not None and prices is not None
        else f"cost unknown for {cfg.model} (give --price-in/--price-out)"
    )
    lines.append(f"tokens {stats.prompt_tokens:,} in + {stats.completion_tokens:,} out = {price_note}")
    line = f"wall {wall:.1f} s"
    window = stats.sending_window()
    if window is not None:
        rate = stats.requests / window * 60
        line += f"; {rate:,.0f} requests/min over the {window:.1f} s from first request to last answer"
    lines.append(line)
    return "\n".join(lines)


def format_dry_run(
    n_items: int, first_requests: list[Messages], cached: int, cfg: ClientConfig, what: str
) -> str:
    """Requests, estimated tokens and cost, before anything is sent."""
    to_send = len(first_requests) - cached
    prompt = sum(estimate_tokens(m) for m in first_requests)  # upper bound when some are cached
    completion = to_send * cfg.max_tokens
    prices = cfg.prices()
    lines = [
        f"dry run: {n_items:,} {what}",
        f"  requests:          {len(first_requests):,} ({cached:,} already cached, {to_send:,} to send;"
        f" re-asks add at most {to_send * cfg.reask:,})",
        f"  prompt tokens:     ~{prompt:,} (4 characters a token)",
        f"  completion tokens: <= {completion:,} (max_tokens {cfg.max_tokens} each)",
    ]
    if prices is not None:
        est_prompt = prompt * (to_send / len(first_requests)) if first_requests else 0
        cost = (est_prompt * prices[0] + completion * prices[1]) / 1e6
        lines.append(
            f"  estimated cost:    <= ${cost:,.2f} ({cfg.model} at ${prices[0]:g}/${prices[1]:g} per 1M in/out)"
        )
    else:
        lines.append(f"  estimated cost:    unknown for {cfg.model} (give --price-in/--price-out)")
    return "\n".join(lines)
