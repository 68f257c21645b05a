"""Which HTTP transport carries the requests, and in how many connection pools.

This is where the client's CPU per request is decided: at --rpm 20000 on 2 cores the transport
and the pool size, not the network, set the ceiling.
"""

from __future__ import annotations

from typing import Any

from phased_tools.client_config import ClientConfig


def has_aiohttp() -> bool:
    """Whether openai's optional aiohttp transport can be used (`pip install aiohttp`)."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return False
    return True


def pick_transport(choice: str) -> str:
    """`--http` resolved to "aiohttp" or "httpx": auto takes aiohttp when it is installed."""
    return "aiohttp" if choice == "aiohttp" or (choice == "auto" and has_aiohttp()) else "httpx"


def import_httpx() -> Any:
    """The httpx module the openai client was built on (its Response class types raw posts)."""
    try:
        import httpx2 as httpx  # the openai client's transport in openai >= 3
    except ImportError:  # pragma: no cover - older openai releases
        import httpx
    return httpx


def open_clients(cfg: ClientConfig, api_key: str, transport: str) -> list[Any]:
    """Enough openai clients for `cfg.concurrency` requests in flight, each with its own pool."""
    import openai

    httpx = import_httpx()
    # httpx's pool scans every connection (a poll() each) on every request, so one pool of
    # 128 connections costs more CPU than the request itself: use pools of <= 16.
    # openai's aiohttp transport (pip install aiohttp) is cheaper still and used if present.
    use_aiohttp = transport == "aiohttp"
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

    return [make_client() for _ in range(n_pools)]
