"""Async chat requests with rate limits, retries, a crash-safe cache and a job runner.

Why our own retry loop rather than the openai client's `max_retries`: every retry is a request
that counts against `--rpm/--tpm`, so it must pass through our limiter; a 429 should pause all
workers, not just the one that saw it; a 200 with a malformed body is retried too (the client
does not); and the backoff cap must be settable (`--max-backoff`). We keep the client's error
classes and its reading of `retry-after-ms` / `Retry-After` (seconds or an HTTP date), and
`x-should-retry`. The client itself runs with `max_retries=0`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import json
import math
import os
import random
import secrets
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phased_tools.cache import AnswerCache, CachedAnswer, CacheError, GroupCommitter, request_key

Messages = list[dict[str, str]]

# USD per 1M tokens (input, output). Override with --price-in/--price-out.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4-0613": (30.0, 60.0),
    "gpt-4": (30.0, 60.0),
    "gpt-4-32k": (60.0, 120.0),
    "gpt-4-turbo": (10.0, 30.0),
    "gpt-4o": (2.5, 10.0),
    "gpt-4o-mini": (0.15, 0.6),
    "gpt-4.1": (2.0, 8.0),
    "gpt-4.1-mini": (0.4, 1.6),
    "gpt-3.5-turbo": (0.5, 1.5),
}


class FatalError(RuntimeError):
    """An error no retry can fix (bad key, unknown model); the whole run stops."""


class RequestFailed(RuntimeError):
    """One request failed for good (retries exhausted or a 400); the item is recorded as failed."""


class ParseError(ValueError):
    """A reply that does not have the expected shape; the item is re-asked."""


@dataclass
class ClientConfig:
    """Everything that decides how requests are sent (not what they say)."""

    model: str = "gpt-4-0613"
    temperature: float = 0.0
    max_tokens: int = 256
    base_url: str | None = None
    concurrency: int = 32
    rpm: float | None = None
    tpm: float | None = None
    timeout: float = 120.0
    max_retries: int = 8
    initial_backoff: float = 0.5
    max_backoff: float = 60.0
    reask: int = 2
    price_in: float | None = None
    price_out: float | None = None
    cache_path: Path = field(default_factory=lambda: default_cache_path())
    progress: bool = True
    http: str = "auto"

    def params(self) -> dict[str, Any]:
        """The sampling parameters that are part of the cache key."""
        return {"temperature": self.temperature, "max_tokens": self.max_tokens}

    def prices(self) -> tuple[float, float] | None:
        """(input, output) USD per 1M tokens, or None when unknown for this model."""
        known = PRICES.get(self.model)
        if self.price_in is None and self.price_out is None:
            return known
        base = known or (0.0, 0.0)
        return (
            base[0] if self.price_in is None else self.price_in,
            base[1] if self.price_out is None else self.price_out,
        )


def default_cache_path() -> Path:
    """One shared cache per user, so a different -o never pays for the same request again."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "phased-tools" / "answers.sqlite"


def add_client_args(p: argparse.ArgumentParser, *, reask_default: int) -> None:
    """The options shared by phased-score and phased-judge."""
    g = p.add_argument_group("model and server")
    g.add_argument("--model", default="gpt-4-0613", help="model name (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0, help="default: %(default)s")
    g.add_argument("--max-tokens", type=int, default=256, help="default: %(default)s")
    g.add_argument(
        "--base-url",
        default=None,
        help="OpenAI-compatible server, e.g. http://localhost:8000/v1 for vLLM "
        "(default: $OPENAI_BASE_URL, else api.openai.com). The key is read only from "
        "$OPENAI_API_KEY.",
    )
    g = p.add_argument_group("throughput and retries")
    g.add_argument("--concurrency", type=int, default=32, help="requests in flight (default: %(default)s)")
    g.add_argument("--rpm", type=float, default=None, help="requests per minute limit")
    g.add_argument("--tpm", type=float, default=None, help="tokens per minute limit (prompt estimate + max_tokens, as OpenAI counts)")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default: %(default)s)")
    g.add_argument("--max-retries", type=int, default=8, help="retries per request on 429/5xx/time-out/malformed reply (default: %(default)s)")
    g.add_argument("--max-backoff", type=float, default=60.0, help="cap on computed backoff seconds; Retry-After is always honoured (default: %(default)s)")
    g.add_argument("--initial-backoff", type=float, default=0.5, help="first backoff in seconds, doubled each retry (default: %(default)s)")
    g.add_argument("--http", choices=("auto", "httpx", "aiohttp"), default="auto", help="transport: openai's httpx default, or its aiohttp one (faster; needs `pip install aiohttp`); auto picks aiohttp when installed")
    g.add_argument("--reask", type=int, default=reask_default, help="re-ask an unparseable reply up to N times, then record it as failed (default: %(default)s)")
    g = p.add_argument_group("cache and cost")
    g.add_argument("--cache", type=Path, default=None, help=f"answer cache (default: {default_cache_path()})")
    g.add_argument("--price-in", type=float, default=None, help="USD per 1M prompt tokens (default: built-in table)")
    g.add_argument("--price-out", type=float, default=None, help="USD per 1M completion tokens (default: built-in table)")
    g.add_argument("--dry-run", action="store_true", help="print the number of requests and the estimated tokens and cost, send nothing")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(a: argparse.Namespace) -> ClientConfig:
    """Validate the shared options into a ClientConfig (argparse error on nonsense)."""
    for name in ("concurrency", "max_tokens"):
        if getattr(a, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1")
    for name in ("rpm", "tpm", "timeout"):
        v = getattr(a, name)
        if v is not None and v <= 0:
            raise SystemExit(f"error: --{name} must be > 0")
    if a.max_retries < 0 or a.reask < 0:
        raise SystemExit("error: --max-retries and --reask must be >= 0")
    return ClientConfig(
        model=a.model,
        temperature=a.temperature,
        max_tokens=a.max_tokens,
        base_url=a.base_url or os.environ.get("OPENAI_BASE_URL") or None,
        concurrency=a.concurrency,
        rpm=a.rpm,
        tpm=a.tpm,
        timeout=a.timeout,
        max_retries=a.max_retries,
        initial_backoff=a.initial_backoff,
        max_backoff=a.max_backoff,
        reask=a.reask,
        price_in=a.price_in,
        price_out=a.price_out,
        cache_path=a.cache or default_cache_path(),
        progress=not a.no_progress,
        http=a.http,
    )


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


@dataclass(frozen=True)
class Answer:
    content: str
    from_cache: bool


def _redactor(secret: str | None) -> Callable[[str], str]:
    if not secret or len(secret) < 4:
        return lambda s: s
    return lambda s: s.replace(secret, "[REDACTED]")


def _has_aiohttp() -> bool:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return False
    return True


def _import_httpx() -> Any:
    try:
        import httpx2 as httpx  # the openai client's transport in openai >= 3
    except ImportError:  # pragma: no cover - older openai releases
        import httpx
    return httpx


class Asker:
    """Sends chat requests: cache first, then limiter, then the server, retrying what can be retried."""

    def __init__(self, cfg: ClientConfig, cache: AnswerCache, api_key: str, stats: Stats) -> None:
        import openai

        self.cfg = cfg
        self.cache = cache
        self.writer = GroupCommitter(cache)
        self.stats = stats
        self.redact = _redactor(api_key)
        self._openai = openai
        self._httpx = httpx = _import_httpx()
        # httpx's pool scans every connection (a poll() each) on every request, so one pool of
        # 128 connections costs more CPU than the request itself: use pools of <= 16.
        # openai's aiohttp transport (pip install aiohttp) is cheaper still and used if present.
        use_aiohttp = cfg.http == "aiohttp" or (cfg.http == "auto" and _has_aiohttp())
        self.transport = "aiohttp" if use_aiohttp else "httpx"
        per_pool = max(cfg.concurrency, 16) if use_aiohttp else 16
        n_pools = max(1, -(-cfg.concurrency // per_pool))

        def make_client() -> Any:
            limits = httpx.Limits(max_connections=per_pool * 2, max_keepalive_connections=per_pool)
            factory = openai.DefaultAioHttpClient if use_aiohttp else openai.DefaultAsyncHttpxClient
            return openai.AsyncOpenAI(
                api_key=api_key,
                base_url=cfg.base_url,
                max_retries=0,
                timeout=cfg.timeout,
                http_client=factory(limits=limits, timeout=cfg.timeout),
            )

        self.clients = [make_client() for _ in range(n_pools)]
        self._next_client = 0
        self.rpm = TokenBucket(cfg.rpm) if cfg.rpm else None
        self.tpm = TokenBucket(cfg.tpm) if cfg.tpm else None
        self._pause_until = 0.0

    async def close(self) -> None:
        for c in self.clients:
            await c.close()
        await asyncio.to_thread(self.writer.close)

    def _backoff(self, attempt: int) -> float:
        base = min(self.cfg.initial_backoff * (2.0**attempt), self.cfg.max_backoff)
        return base * (1.0 - 0.25 * random.random())

    async def _wait_pause(self) -> None:
        while (delay := self._pause_until - time.monotonic()) > 0:
            await asyncio.sleep(delay)

    async def ask(self, messages: Messages) -> Answer:
        """One reply for `messages`: from the cache if paid for before, else from the server."""
        key = request_key(self.cfg.model, messages, self.cfg.params())
        hit = self.cache.get(key)
        if hit is not None:
            self.stats.cache_hits += 1
            return Answer(hit.content, from_cache=True)
        oa = self._openai
        payload = {"model": self.cfg.model, "messages": messages, **self.cfg.params()}
        reason = "no attempt made"
        for attempt in range(self.cfg.max_retries + 1):
            await self._wait_pause()
            if self.rpm:
                await self.rpm.acquire(1)
            if self.tpm:
                await self.tpm.acquire(estimate_tokens(messages) + self.cfg.max_tokens)
            await self._wait_pause()
            self.stats.requests += 1
            if self.stats.first_sent is None:
                self.stats.first_sent = time.monotonic()
            delay: float | None = None
            try:
                # The client's low-level post: its auth, base URL, error classes and
                # time-outs, without the per-request typing cost of .create() (that cost
                # alone capped throughput below --rpm 20000 on 2 cores).
                client = self.clients[self._next_client % len(self.clients)]
                self._next_client += 1
                resp = await client.post(
                    "/chat/completions", body=payload, cast_to=self._httpx.Response
                )
                content, finish, usage = _extract(json.loads(resp.content))
            except oa.APIStatusError as e:
                status = e.status_code
                headers = getattr(e.response, "headers", None)
                should = headers.get("x-should-retry") if headers is not None else None
                if status in (401, 403):
                    raise FatalError(
                        f"authentication failed (HTTP {status}); check OPENAI_API_KEY and --base-url"
                    ) from None
                if status == 404:
                    raise FatalError(
                        f"HTTP 404 for model {self.cfg.model!r}: {self.redact(_message(e))}; "
                        "check --model and --base-url"
                    ) from None
                retryable = should == "true" or (
                    should != "false" and (status in (408, 409, 429) or status >= 500)
                )
                reason = f"HTTP {status}: {self.redact(_message(e))}"
                if not retryable:
                    raise RequestFailed(reason) from None
                self.stats.retries[str(status)] += 1
                delay = parse_retry_after(headers)
                if status == 429 and delay is not None:
                    # A rate limit is the server's, not this request's: pause every worker.
                    self._pause_until = max(self._pause_until, time.monotonic() + delay)
            except oa.APITimeoutError:
                reason = f"time-out after {self.cfg.timeout:g} s"
                self.stats.retries["timeout"] += 1
            except oa.APIConnectionError as e:
                reason = f"connection error: {self.redact(type(e.__cause__ or e).__name__)}"
                self.stats.retries["connection"] += 1
            except (oa.APIResponseValidationError, ParseError, ValueError, TypeError) as e:
                # 200 with a body that is not a chat completion (bad JSON, no choices).
                reason = f"malformed response: {self.redact(str(e))[:200]}"
                self.stats.retries["malformed"] += 1
            else:
                self.stats.answers += 1
                self.stats.prompt_tokens += usage[0]
                self.stats.completion_tokens += usage[1]
                self.stats.last_answer = time.monotonic()
                # Durable before it is used: the writer thread commits it (with whatever other
                # answers are waiting) and only then lets this request go on.
                stored = self.writer.submit(key, self.cfg.model, payload, CachedAnswer(content, finish, *usage))
                try:
                    await asyncio.wrap_future(stored)
                except (sqlite3.Error, OSError) as e:
                    raise FatalError(
                        f"cannot store answers in the cache {self.cache.path}: {e}; "
                        "free disk space or pass another --cache, then run again (stored answers are kept)"
                    ) from None
                return Answer(content, from_cache=False)
            if attempt < self.cfg.max_retries:
                await asyncio.sleep(delay if delay is not None else self._backoff(attempt))
        raise RequestFailed(f"{reason} (gave up after {self.cfg.max_retries + 1} attempts)")


def _message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        msg = body.get("message") or (body.get("error") or {}).get("message")
        if msg:
            return str(msg)[:300]
    return str(getattr(e, "message", "") or type(e).__name__)[:300]


def _extract(data: Any) -> tuple[str, str | None, tuple[int, int]]:
    """Content, finish reason and (prompt, completion) tokens; ParseError if not a chat completion."""
    try:
        choice = data["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ParseError("body is not a chat completion (no choices[0].message.content)") from None
    if not isinstance(content, str):
        raise ParseError("message content is not a string")
    usage = data.get("usage") or {}
    pt = int(usage.get("prompt_tokens") or 0)
    ct = int(usage.get("completion_tokens") or 0)
    return content, choice.get("finish_reason"), (pt, ct)


@dataclass
class Job:
    """One question that needs a parseable answer: messages, a parser and the re-ask text."""

    messages: Messages
    parse: Callable[[str], Any]
    reask_text: str


@dataclass
class JobResult:
    """A parsed value or the reason there is none, with every raw reply in order."""

    value: Any = None
    error: str | None = None
    replies: list[str] = field(default_factory=list)
    from_cache: bool = True

    @property
    def ok(self) -> bool:
        return self.error is None


class Progress:
    """tqdm bar with spend so far; falls back to nothing when tqdm is missing or disabled."""

    def __init__(self, total: int, enabled: bool, stats: Stats, prices: tuple[float, float] | None, desc: str) -> None:
        self.stats, self.prices, self.bar = stats, prices, None
        self.failed = 0
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # pragma: no cover
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=desc, unit="item", file=sys.stderr, smoothing=0.1, dynamic_ncols=True)

    def update(self, result: JobResult) -> None:
        self.failed += not result.ok
        if self.bar is not None:
            cost = self.stats.cost(self.prices)
            self.bar.set_postfix_str(
                (f"${cost:.2f} " if cost is not None else "")
                + f"req={self.stats.requests} failed={self.failed}",
                refresh=False,
            )
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def run_jobs(
    jobs: Sequence[Job], asker: Asker, *, reask: int, progress: Progress | None = None
) -> list[JobResult]:
    """Answer every job with `asker.cfg.concurrency` workers; results in job order."""
    results: list[JobResult | None] = [None] * len(jobs)
    todo = iter(enumerate(jobs))

    async def one(job: Job) -> JobResult:
        res = JobResult()
        messages = list(job.messages)
        for k in range(reask + 1):
            try:
                ans = await asker.ask(messages)
            except RequestFailed as e:
                res.error, res.from_cache = str(e), False
                return res
            res.replies.append(ans.content)
            res.from_cache &= ans.from_cache
            try:
                res.value = job.parse(ans.content)
                res.error = None
                return res
            except ParseError as e:
                res.error = f"{e} (after {k + 1} {'reply' if k == 0 else 'replies'})"
            messages = messages + [
                {"role": "assistant", "content": ans.content},
                {"role": "user", "content": job.reask_text},
            ]
        return res

    async def worker() -> None:
        for i, job in todo:
            res = await one(job)
            results[i] = res
            if progress is not None:
                progress.update(res)

    try:
        async with asyncio.TaskGroup() as tg:
            for _ in range(min(asker.cfg.concurrency, max(len(jobs), 1))):
                tg.create_task(worker())
    except* FatalError as group:
        raise group.exceptions[0] from None  # one clear message, the other workers cancelled
    return [r for r in results if r is not None]


@dataclass
class Answered:
    """Every job's result, what the run cost, and its wall time in seconds."""

    results: list[JobResult]
    stats: Stats
    wall: float


def answer_jobs(prog: str, desc: str, jobs: Sequence[Job], cfg: ClientConfig, api_key: str) -> Answered | int:
    """Answer `jobs` through the cache with a progress bar labelled `desc`.

    A fatal error or Ctrl-C is reported under `prog` and gives its exit status instead (1 or
    130); answers received by then are in the cache either way.
    """
    stats = Stats()
    t0 = time.monotonic()
    try:
        results = asyncio.run(_answer_jobs(desc, jobs, cfg, api_key, stats))
    except FatalError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; answers so far are cached, run again to resume", file=sys.stderr)
        return 130
    return Answered(results, stats, time.monotonic() - t0)


async def _answer_jobs(desc: str, jobs: Sequence[Job], cfg: ClientConfig, api_key: str, stats: Stats
                       ) -> list[JobResult]:
    try:
        cache = AnswerCache(cfg.cache_path)
    except CacheError as e:
        raise FatalError(str(e)) from None
    asker = Asker(cfg, cache, api_key, stats)
    progress = Progress(len(jobs), cfg.progress, stats, cfg.prices(), desc)
    try:
        return await run_jobs(jobs, asker, reask=cfg.reask, progress=progress)
    finally:
        progress.close()
        await asker.close()
        cache.close()


def api_key_or_exit(cfg: ClientConfig) -> str:
    """The key from $OPENAI_API_KEY only; a local server (--base-url) may do without one."""
    key = os.environ.get("OPENAI_API_KEY", "")
    if key:
        return key
    if cfg.base_url:
        return "EMPTY"  # vLLM and friends accept any key
    raise SystemExit("error: set OPENAI_API_KEY (or --base-url for a local OpenAI-compatible server)")


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


def cached_count(cfg: ClientConfig, requests: list[Messages]) -> int:
    """How many of `requests` already have an answer (opens the cache read-only if it exists)."""
    if not cfg.cache_path.exists():
        return 0
    try:
        cache = AnswerCache(cfg.cache_path)
    except CacheError as e:
        print(f"warning: {e}; counting every request as not cached", file=sys.stderr)
        return 0
    try:
        keys = cache.keys()
        return sum(request_key(cfg.model, m, cfg.params()) in keys for m in requests)
    finally:
        cache.close()


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
