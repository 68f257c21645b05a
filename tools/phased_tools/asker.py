"""One reply per request: from the cache if paid for before, else from the server, retried.

Why our own retry loop rather than the openai client's `max_retries`: every retry is a request
that counts against `--rpm/--tpm`, so it must pass through our limiter; a 429 should pause all
workers, not just the one that saw it; a 200 with a malformed body is retried too (the client
does not); and the backoff cap must be settable (`--max-backoff`). We keep the client's error
classes and its reading of `retry-after-ms` / `Retry-After` (seconds or an HTTP date), and
`x-should-retry`. The client itself runs with `max_retries=0`.

One failure is not retried: a server never reached in this run (connection refused, host name
unknown) stops the run at once with one line naming the URL, because retrying it only turns a
typo in --base-url or a server not yet started into minutes of silence and a file of
"failed" items. Once any reply has come, the same errors are a server dropping mid-run, retried.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from phased_tools.cache import AnswerCache, CachedAnswer, GroupCommitter, request_key
from phased_tools.chat import FatalError, Messages, ParseError, RequestFailed
from phased_tools.client_config import ClientConfig
from phased_tools.rate_limits import TokenBucket, estimate_tokens, parse_retry_after
from phased_tools.summary import Stats
from phased_tools.transport import import_httpx, open_clients, pick_transport


@dataclass(frozen=True)
class Answer:
    content: str
    from_cache: bool


def redactor(secret: str | None) -> Callable[[str], str]:
    """A function that blanks `secret` out of a message (servers may echo the key back)."""
    if not secret or len(secret) < 4:
        return lambda s: s
    return lambda s: s.replace(secret, "[REDACTED]")


def causes(e: BaseException) -> Iterator[BaseException]:
    """`e`, then what caused it, and so on down to the socket's own error."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        cause = cause.__cause__ or cause.__context__


def unreachable_reason(e: BaseException) -> str | None:
    """Why the server could not be reached at all (a refused connection or an unknown host
    name), found anywhere in `e`'s chain of causes; None for any other failure.

    The chain, not the class, decides: openai's aiohttp transport reports every connection
    error (refused, or hung up on) as a ConnectTimeout, an APITimeoutError; its httpx one as an
    APIConnectionError. A real time-out has a TimeoutError in its chain with either.
    """
    for cause in causes(e):
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, socket.gaierror):
            return f"host name not found: {cause.strerror or cause}"
    return None


def unreachable_message(url: str, why: str) -> str:
    """One line for a server never reached: the URL, why, and what to check."""
    return (f"cannot reach {url.rstrip('/')} ({why}): is the server running and --base-url "
            "(or $OPENAI_BASE_URL) right? No output written; run again once it answers")


def cached_answer(cfg: ClientConfig, cache: AnswerCache, messages: Messages, stats: Stats,
                  fresh: set[str] | frozenset[str]) -> tuple[str, Answer | None]:
    """The request's cache key and its stored answer, if any (a cache hit unless in `fresh`)."""
    key = request_key(cfg.model, messages, cfg.params())
    hit = cache.get(key)
    if hit is None:
        return key, None
    from_cache = key not in fresh
    stats.cache_hits += from_cache
    return key, Answer(hit.content, from_cache=from_cache)


class Asker:
    """Sends chat requests: cache first, then limiter, then the server, retrying what can be retried."""

    def __init__(self, cfg: ClientConfig, cache: AnswerCache, api_key: str, stats: Stats,
                 fresh: set[str] | frozenset[str] = frozenset()) -> None:
        import openai

        self.cfg = cfg
        self.fresh = fresh  # keys this run paid for already (in a batch): not counted as cache hits
        self.cache = cache
        self.writer = GroupCommitter(cache)
        self.stats = stats
        self.redact = redactor(api_key)
        self._openai = openai
        self._httpx = import_httpx()
        self.transport = pick_transport(cfg.http)
        self.clients = open_clients(cfg, api_key, self.transport)
        self._next_client = 0
        self.rpm = TokenBucket(cfg.rpm) if cfg.rpm else None
        self.tpm = TokenBucket(cfg.tpm) if cfg.tpm else None
        self._pause_until = 0.0
        self.reached = False  # any HTTP reply seen: from then on a refused connection is retried

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
        key, stored = cached_answer(self.cfg, self.cache, messages, self.stats, self.fresh)
        if stored is not None:
            return stored
        oa = self._openai
        payload = request_body(self.cfg, messages)
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
                self.reached = True
                content, finish, usage = extract_reply(json.loads(resp.content))
            except oa.APIStatusError as e:
                self.reached = True
                status = e.status_code
                headers = getattr(e.response, "headers", None)
                should = headers.get("x-should-retry") if headers is not None else None
                if status in (401, 403):
                    raise FatalError(
                        f"authentication failed (HTTP {status}); check OPENAI_API_KEY and --base-url"
                    ) from None
                if status == 404:
                    if model_not_found(e, self.cfg.model):
                        raise FatalError(retired_model_message(self.cfg.model)) from None
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
            except oa.APIConnectionError as e:  # APITimeoutError too
                why = unreachable_reason(e)
                if why is not None and not self.reached:
                    url = self.redact(str(self.clients[0].base_url))
                    raise FatalError(unreachable_message(url, why)) from None
                chain = list(causes(e))
                if any(isinstance(c, TimeoutError) for c in chain):
                    reason = f"time-out after {self.cfg.timeout:g} s"
                    self.stats.retries["timeout"] += 1
                else:
                    reason = f"connection error: {self.redact(why or type(chain[-1]).__name__)}"
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


def model_not_found(e: Any, model: str) -> bool:
    """Whether an HTTP 404 error says the model is unknown (code `model_not_found`, or a message
    naming it), not that the URL is wrong."""
    message = _message(e)
    return getattr(e, "code", None) == "model_not_found" or (model in message and "model" in message.lower())


def retired_model_message(model: str) -> str:
    """One line for a model the server does not know: it may have been retired; what to do."""
    return (
        f"the server does not know model {model!r} (HTTP 404 model_not_found): it may be retired "
        "(OpenAI lists the paper's gpt-4-0613 snapshot for shutdown in October 2026); choose "
        "another with --model (e.g. gpt-4o) or a local model with --base-url "
        "http://localhost:8000/v1 (a vLLM server)"
    )


def _message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        msg = body.get("message") or (body.get("error") or {}).get("message")
        if msg:
            return str(msg)[:300]
    return str(getattr(e, "message", "") or type(e).__name__)[:300]


def request_body(cfg: ClientConfig, messages: Messages) -> dict[str, Any]:
    """The JSON body of a chat request (live, or one line of a batch file)."""
    return {"model": cfg.model, "messages": messages, **cfg.params()}


def extract_reply(data: Any) -> tuple[str, str | None, tuple[int, int]]:
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
