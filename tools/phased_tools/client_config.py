"""How requests are sent (not what they say): the shared command-line options, prices, the key."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
# The OpenAI Batch API bills every token at this fraction of the live price.
BATCH_DISCOUNT = 0.5
# Per-batch limits of the OpenAI Batch API (requests, bytes of the input file).
BATCH_MAX_REQUESTS = 50_000
BATCH_MAX_BYTES = 200 * 1024 * 1024


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
    batch: bool = False
    batch_fallback: str = "batch"  # "batch": re-send what failed in a follow-up batch; "live": live
    batch_retries: int = 2
    batch_poll: float = 30.0
    batch_max_requests: int = BATCH_MAX_REQUESTS
    batch_max_bytes: int = BATCH_MAX_BYTES
    batch_export: Path | None = None
    batch_import: Path | None = None

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
    g.add_argument("--model", default="gpt-4-0613",
                   help="model name (default: %(default)s, the paper's snapshot, which OpenAI lists for "
                        "shutdown in October 2026: name another here, or a local vLLM server with --base-url)")
    g.add_argument("--temperature", type=float, default=0.0, help="default: %(default)s")
    g.add_argument("--max-tokens", type=int, default=256, help="default: %(default)s")
    g.add_argument(
        "--base-url",
        default=None,
        help="OpenAI-compatible server, e.g. http://localhost:8000/v1 for vLLM "
        "(default: $OPENAI_BASE_URL, else api.openai.com). The key is read only from "
        "$OPENAI_API_KEY; with a --base-url (or $OPENAI_BASE_URL) and no $OPENAI_API_KEY, the key "
        "'EMPTY' is sent (as 'Authorization: Bearer EMPTY'; vLLM accepts any key). A server not "
        "reached before its first reply (connection refused, unknown host) stops the run at once "
        "(exit 1); one that drops later is retried.",
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
    g = p.add_argument_group("OpenAI Batch API (half price, answers within 24 h)")
    g.add_argument("--batch", action="store_true", help="send through the Batch API: upload, create, poll, download "
                   "into the same cache; a killed run started again re-attaches to its batches")
    g.add_argument("--batch-fallback", choices=("batch", "live"), default="batch",
                   help="what failed, expired or did not parse is re-sent in a follow-up batch, or live "
                   "(default: %(default)s)")
    g.add_argument("--batch-retries", type=int, default=2, metavar="N", help="rounds of batches in all: 1 + --reask + this, "
                   "so failed or expired items get this many more tries (default: %(default)s)")
    g.add_argument("--batch-poll", type=float, default=30.0, metavar="S", help="seconds between status checks (default: %(default)s)")
    g.add_argument("--batch-max-requests", type=int, default=BATCH_MAX_REQUESTS, metavar="N",
                   help="split into batches of at most N requests (default: %(default)s, the API's limit)")
    g.add_argument("--batch-max-bytes", type=int, default=BATCH_MAX_BYTES, metavar="N",
                   help="... and at most N bytes of JSONL (default: %(default)s, the API's limit)")
    g.add_argument("--batch-export", type=Path, default=None, metavar="FILE",
                   help="write the requests not yet cached as batch JSONL (e.g. for vLLM's run-batch), send nothing")
    g.add_argument("--batch-import", type=Path, default=None, metavar="FILE",
                   help="store a batch output JSONL (OpenAI's or vLLM's format) in the cache, send nothing")


def config_from_args(a: argparse.Namespace) -> ClientConfig:
    """Validate the shared options into a ClientConfig (argparse error on nonsense)."""
    for name in ("concurrency", "max_tokens"):
        if getattr(a, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1")
    for name in ("rpm", "tpm", "timeout"):
        v = getattr(a, name)
        if v is not None and v <= 0:
            raise SystemExit(f"error: --{name} must be > 0")
    if a.max_retries < 0 or a.reask < 0 or a.batch_retries < 0:
        raise SystemExit("error: --max-retries, --reask and --batch-retries must be >= 0")
    if a.batch_poll <= 0 or a.batch_max_requests < 1 or a.batch_max_bytes < 1:
        raise SystemExit("error: --batch-poll, --batch-max-requests and --batch-max-bytes must be > 0")
    if a.batch_export and a.batch_import:
        raise SystemExit("error: give --batch-export or --batch-import, not both")
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
        batch=a.batch,
        batch_fallback=a.batch_fallback,
        batch_retries=a.batch_retries,
        batch_poll=a.batch_poll,
        batch_max_requests=a.batch_max_requests,
        batch_max_bytes=a.batch_max_bytes,
        batch_export=a.batch_export,
        batch_import=a.batch_import,
    )


def api_key_or_exit(cfg: ClientConfig) -> str:
    """The key from $OPENAI_API_KEY only; a local server (--base-url) may do without one."""
    key = os.environ.get("OPENAI_API_KEY", "")
    if key:
        return key
    if cfg.base_url:
        return "EMPTY"  # vLLM and friends accept any key (documented in --base-url's help)
    raise SystemExit("error: set OPENAI_API_KEY (or --base-url for a local OpenAI-compatible server)")
