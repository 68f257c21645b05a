"""Answering many questions: each job asked (and re-asked until it parses) by a pool of workers.

A job's result is a parsed value or the reason there is none. `answer_jobs` is the one call a
command makes (a fatal error or Ctrl-C becomes its exit status); `cached_count` serves --dry-run.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from phased_tools.asker import Asker
from phased_tools.cache import AnswerCache, CacheError, request_key
from phased_tools.chat import FatalError, Messages, ParseError, RequestFailed
from phased_tools.client_config import ClientConfig
from phased_tools.summary import Stats


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


def progress_bar(total: int, desc: str, enabled: bool, **options: Any) -> Any:
    """A tqdm bar on stderr, or None when disabled or tqdm (an optional extra) is missing."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True, **options)


def open_cache(cfg: ClientConfig) -> AnswerCache:
    """The answer cache, or a FatalError (one line) naming why it cannot be opened."""
    try:
        return AnswerCache(cfg.cache_path)
    except CacheError as e:
        raise FatalError(str(e)) from None


class Progress:
    """tqdm bar with spend so far; falls back to nothing when tqdm is missing or disabled."""

    def __init__(self, total: int, enabled: bool, stats: Stats, prices: tuple[float, float] | None, desc: str) -> None:
        self.stats, self.prices = stats, prices
        self.failed = 0
        self.bar = progress_bar(total, desc, enabled, smoothing=0.1)

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
        """Close the bar; a bar still at 0 is erased, so a run stopped before any answer (server
        unreachable, bad key) leaves just its one error line."""
        if self.bar is not None:
            self.bar.leave = self.bar.n > 0
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


def answer_jobs(prog: str, desc: str, jobs: Sequence[Job], cfg: ClientConfig, api_key: str,
                stats: Stats | None = None, fresh: set[str] | frozenset[str] = frozenset()) -> Answered | int:
    """Answer `jobs` through the cache with a progress bar labelled `desc`.

    A fatal error or Ctrl-C is reported under `prog` and gives its exit status instead (1 or
    130); answers received by then are in the cache either way. `stats` and `fresh` (keys paid
    for earlier in this run, not cache hits) carry on the count of a run that began in batches.
    """
    stats = stats if stats is not None else Stats()
    t0 = time.monotonic()
    try:
        results = asyncio.run(_answer_jobs(desc, jobs, cfg, api_key, stats, fresh))
    except FatalError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; answers so far are cached, run again to resume", file=sys.stderr)
        return 130
    return Answered(results, stats, time.monotonic() - t0)


async def _answer_jobs(desc: str, jobs: Sequence[Job], cfg: ClientConfig, api_key: str, stats: Stats,
                       fresh: set[str] | frozenset[str]) -> list[JobResult]:
    cache = open_cache(cfg)
    asker = Asker(cfg, cache, api_key, stats, fresh)
    progress = Progress(len(jobs), cfg.progress, stats, cfg.prices(), desc)
    try:
        return await run_jobs(jobs, asker, reask=cfg.reask, progress=progress)
    finally:
        progress.close()
        await asker.close()
        cache.close()


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
