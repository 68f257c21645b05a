"""--batch, --batch-export, --batch-import: the same jobs answered through batch files.

Rounds: what the cache cannot answer yet (first requests, then the re-asks of replies that did
not parse, then what failed or expired) is sent as batches, waited for and read into the cache,
until every job is answered or the rounds (one per re-ask, plus --batch-retries) run out. The
results then come from the cache alone, exactly as a live run computes them (`run_jobs`), or,
with --batch-fallback live, from a live run that finds the batch answers cached.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from phased_tools.asker import Answer, cached_answer, redactor, request_body, retired_model_message
from phased_tools.batch_api import (
    TERMINAL,
    BatchClient,
    OutputLine,
    read_output_line,
    request_line,
    split_lines,
)
from phased_tools.batch_ledger import BatchLedger
from phased_tools.cache import AnswerCache, GroupCommitter
from phased_tools.chat import FatalError, Messages, RequestFailed
from phased_tools.client_config import ClientConfig
from phased_tools.jobs import (
    Answered,
    Job,
    JobResult,
    answer_jobs,
    open_cache,
    progress_bar,
    run_jobs,
)
from phased_tools.summary import Stats

SERVER_CLOCK_SLACK_S = 3600.0  # how far the server's created_at may trail this machine's clock


class CacheOnlyAsker:
    """Answers from the cache alone; a miss is noted (to be sent) and fails its job for now."""

    def __init__(self, cfg: ClientConfig, cache: AnswerCache, stats: Stats, fresh: set[str],
                 reasons: dict[str, str]) -> None:
        self.cfg, self.cache, self.stats, self.fresh, self.reasons = cfg, cache, stats, fresh, reasons
        self.missing: dict[str, dict[str, Any]] = {}

    async def ask(self, messages: Messages) -> Answer:
        key, stored = cached_answer(self.cfg, self.cache, messages, self.stats, self.fresh)
        if stored is not None:
            return stored
        self.missing[key] = request_body(self.cfg, messages)
        raise RequestFailed(self.reasons.get(key, "no answer in the cache"))


def from_cache(jobs: Sequence[Job], cfg: ClientConfig, cache: AnswerCache, stats: Stats | None = None,
               fresh: set[str] | None = None, reasons: dict[str, str] | None = None
               ) -> tuple[list[JobResult], dict[str, dict[str, Any]]]:
    """Every job's result as far as the cache answers it, and the requests (key -> body) it lacks."""
    asker = CacheOnlyAsker(cfg, cache, Stats() if stats is None else stats, set() if fresh is None else fresh,
                           {} if reasons is None else reasons)
    results = asyncio.run(run_jobs(jobs, asker, reask=cfg.reask))  # type: ignore[arg-type]
    return results, asker.missing


def store(cache: AnswerCache, cfg: ClientConfig, bodies: dict[str, dict[str, Any]], lines: list[OutputLine],
          stats: Stats, fresh: set[str], reasons: dict[str, str]) -> int:
    """Commit the answers among `lines` whose request is in `bodies`; note why the others failed."""
    if any(line.code == "model_not_found" for line in lines):
        raise FatalError(retired_model_message(cfg.model))
    writer = GroupCommitter(cache)
    stored = []
    for line in lines:
        if line.key not in bodies or line.key in fresh:
            continue
        if line.answer is None:
            reasons[line.key] = line.error or "no answer"
            continue
        stored.append(writer.submit(line.key, cfg.model, bodies[line.key], line.answer))
        fresh.add(line.key)
        stats.answers += 1
        stats.batch_prompt_tokens += line.answer.prompt_tokens
        stats.batch_completion_tokens += line.answer.completion_tokens
    writer.close()
    for fut in stored:
        if (e := fut.exception()) is not None:
            raise FatalError(f"cannot store answers in the cache {cache.path}: {e}; free disk space or pass "
                             "another --cache, then run again (batches are recorded: nothing is paid twice)")
    return len(stored)


def wait_for(api: BatchClient, ids: list[str], cfg: ClientConfig, desc: str, total: int) -> list[Any]:
    """Poll until every batch has ended, with a progress bar over their requests."""
    bar = progress_bar(total, f"{desc} (batch)", cfg.progress)
    ended: dict[str, Any] = {}
    try:
        while True:
            seen = {i: ended.get(i) or api.retrieve(i) for i in ids}
            ended.update({i: b for i, b in seen.items() if b.status in TERMINAL})
            if bar is not None:
                counts = [getattr(b, "request_counts", None) for b in seen.values()]
                bar.n = sum((c.completed + c.failed) if c else 0 for c in counts)
                bar.set_postfix_str(" ".join(sorted({b.status for b in seen.values()})), refresh=True)
            if len(ended) == len(ids):
                return [ended[i] for i in ids]
            time.sleep(cfg.batch_poll)
    finally:
        if bar is not None:
            bar.close()


def read_back(api: BatchClient, batch: Any) -> list[OutputLine]:
    """Every line of a finished batch's output and error files (unreadable lines are skipped)."""
    lines = []
    for file_id in (batch.output_file_id, batch.error_file_id):
        for text in api.download(file_id).splitlines() if file_id else ():
            try:
                lines.append(read_output_line(json.loads(text)))
            except ValueError:
                continue  # its request is re-sent as unanswered
    return lines


def run_round(pending: dict[str, dict[str, Any]], cfg: ClientConfig, api: BatchClient, cache: AnswerCache,
              ledger: BatchLedger, stats: Stats, fresh: set[str], reasons: dict[str, str], desc: str) -> None:
    """Send `pending` (re-attaching to recorded batches that hold some of it), wait, read back."""
    attached = [b for b in ledger.open_batches(cfg.model) if b.keys & pending.keys()]
    stats.batches_attached += len(attached)
    holds = {b.batch_id: b.keys & pending.keys() for b in attached}
    waiting = set().union(*holds.values())
    lines = {k: request_line(k, body) for k, body in pending.items() if k not in waiting}
    for group in split_lines(lines, cfg.batch_max_requests, cfg.batch_max_bytes):
        token = ledger.intend(cfg.model, list(group))  # a run killed before the id is recorded finds it
        batch_id = api.submit(b"".join(group.values()), token)
        ledger.record(batch_id, cfg.model, list(group), token)  # before waiting: a killed run re-attaches
        holds[batch_id] = set(group)
        stats.batches_created += 1
        stats.requests += len(group)
    for batch in wait_for(api, list(holds), cfg, desc, len(pending)):
        got = read_back(api, batch)
        store(cache, cfg, pending, got, stats, fresh, reasons)
        for key in holds[batch.id] - fresh - {line.key for line in got}:
            reasons[key] = f"batch {batch.id} ended {batch.status} without an answer"
        ledger.mark_done(batch.id)


def resolve_intents(api: BatchClient, ledger: BatchLedger, model: str) -> None:
    """Record the batches a killed run created without recording their id; forget the others."""
    intents = ledger.intents(model)
    if not intents:
        return
    since = intents[0].created - SERVER_CLOCK_SLACK_S
    found = api.find_tokens({i.token for i in intents}, since)
    for intent in intents:
        if intent.token in found:
            ledger.record(found[intent.token], model, intent.keys, intent.token)
        else:
            ledger.drop_intent(intent.token)


def batch_results(desc: str, jobs: Sequence[Job], cfg: ClientConfig, api_key: str, stats: Stats,
                  fresh: set[str]) -> list[JobResult] | None:
    """Every job answered through rounds of batches; None when what is left should go live."""
    cache = open_cache(cfg)
    ledger = BatchLedger(cfg.cache_path)
    api = BatchClient(cfg, api_key, redactor(api_key))
    reasons: dict[str, str] = {}
    try:
        resolve_intents(api, ledger, cfg.model)
        for _ in range(cfg.reask + 1 + cfg.batch_retries):
            _, pending = from_cache(jobs, cfg, cache, fresh=fresh, reasons=reasons)
            if not pending:
                break
            run_round(pending, cfg, api, cache, ledger, stats, fresh, reasons, desc)
        results, pending = from_cache(jobs, cfg, cache, stats, fresh, reasons)
        if pending and cfg.batch_fallback == "live":
            return None
        return results
    finally:
        api.close()
        ledger.close()
        cache.close()


def get_answers(prog: str, desc: str, jobs: Sequence[Job], cfg: ClientConfig, api_key: str) -> Answered | int:
    """`answer_jobs`, or with --batch the same results through the Batch API (exit status on error)."""
    if not cfg.batch:
        return answer_jobs(prog, desc, jobs, cfg, api_key)
    stats, fresh, t0 = Stats(), set[str](), time.monotonic()
    try:
        results = batch_results(desc, jobs, cfg, api_key, stats, fresh)
    except FatalError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the batches are recorded in the cache: run again to re-attach to them",
              file=sys.stderr)
        return 130
    if results is None:
        done = answer_jobs(prog, desc, jobs, cfg, api_key, stats, fresh)
        if isinstance(done, int):
            return done
        results = done.results
    return Answered(results, stats, time.monotonic() - t0)
