"""What a run cost and how it went: the counters, the end-of-run summary and the dry-run estimate."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from phased_tools.chat import Messages
from phased_tools.client_config import BATCH_DISCOUNT, ClientConfig
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
    batch_prompt_tokens: int = 0  # tokens answered through the Batch API, billed at BATCH_DISCOUNT
    batch_completion_tokens: int = 0
    batches_created: int = 0
    batches_attached: int = 0  # left unfinished by a killed run, waited for again

    def sending_window(self) -> float | None:
        """Seconds from the first request to the last answer (None before there are both)."""
        if self.first_sent is None or self.last_answer is None or self.last_answer <= self.first_sent:
            return None
        return self.last_answer - self.first_sent

    def cost(self, prices: tuple[float, float] | None) -> float | None:
        if prices is None:
            return None
        live = self.prompt_tokens * prices[0] + self.completion_tokens * prices[1]
        batch = self.batch_prompt_tokens * prices[0] + self.batch_completion_tokens * prices[1]
        return (live + batch * BATCH_DISCOUNT) / 1e6


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
    if stats.batches_created or stats.batches_attached:
        lines.append(f"batches created {stats.batches_created:,}, re-attached {stats.batches_attached:,};"
                     f" {stats.batch_prompt_tokens + stats.batch_completion_tokens:,} of the tokens at batch"
                     f" prices (x{BATCH_DISCOUNT:g})")
    tokens_in = stats.prompt_tokens + stats.batch_prompt_tokens
    tokens_out = stats.completion_tokens + stats.batch_completion_tokens
    lines.append(f"tokens {tokens_in:,} in + {tokens_out:,} out = {price_note}")
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
    if prices is None:
        lines.append(f"  estimated cost:    unknown for {cfg.model} (give --price-in/--price-out)")
        return "\n".join(lines)
    est_prompt = prompt * (to_send / len(first_requests)) if first_requests else 0
    live = (est_prompt * prices[0] / 1e6, completion * prices[1] / 1e6)
    batch = (live[0] * BATCH_DISCOUNT, live[1] * BATCH_DISCOUNT)
    lines += [
        f"  estimated cost:    <= ${sum(live):,.2f} live, <= ${sum(batch):,.2f} with --batch"
        f" ({cfg.model}, USD per 1M tokens in/out)",
        f"    {'':12} {'live':>14} {'batch':>14}",
        f"    {'price in/out':12} {f'{prices[0]:g}/{prices[1]:g}':>14}"
        f" {f'{prices[0] * BATCH_DISCOUNT:g}/{prices[1] * BATCH_DISCOUNT:g}':>14}",
        f"    {'prompt':12} {f'${live[0]:,.2f}':>14} {f'${batch[0]:,.2f}':>14}",
        f"    {'completion':12} {f'${live[1]:,.2f}':>14} {f'${batch[1]:,.2f}':>14}",
        f"    {'total':12} {f'${sum(live):,.2f}':>14} {f'${sum(batch):,.2f}':>14}",
    ]
    return "\n".join(lines)
