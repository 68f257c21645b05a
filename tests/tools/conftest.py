"""Fixtures for the phased_tools tests: a fake OpenAI server, a secret key, an isolated cache."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_openai import FakeOpenAI  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO / ".." / "shared" / "data"
STAGE3 = SHARED_DATA / "alpaca-scored" / "en-alpaca52k-stage3.jsonl"
# Short backoffs keep retries quick; the request time-out is generous so that a loaded machine
# never turns a slow answer into an extra attempt (tests count attempts). Tests of hung requests
# pass --timeout HANG_TIMEOUT: the fake server holds those until it stops, so only the client's
# clock matters, and a spurious time-out there costs a retry, never a failure.
FAST = ["--no-progress", "--timeout", "60", "--initial-backoff", "0.02", "--max-backoff", "0.1"]
HANG_TIMEOUT = "1"


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A unique API key in the environment; the tests grep every produced file for it."""
    key = f"sk-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return key


def server_factory(cls: type, secret: str) -> Iterator[Callable[..., Any]]:
    """A factory fixture's body: make(**options) starts a `cls` server that checks the key;
    every server it started stops at teardown."""
    started: list[Any] = []

    def make(**kw: object) -> Any:
        kw.setdefault("api_key", secret)
        srv = cls(**kw)
        srv.start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture
def server(secret: str) -> Iterator[Callable[..., FakeOpenAI]]:
    """Factory: server(**options) starts a FakeOpenAI that checks the key; all stop at teardown."""
    yield from server_factory(FakeOpenAI, secret)


def write_alpaca(path: Path, n: int, *, prefix: str = "Task", extra: Callable[[int], dict] | None = None) -> Path:
    """n distinct Alpaca records (every other one with an input)."""
    items = []
    for i in range(n):
        item = {"instruction": f"{prefix} {i}: describe item {i}.", "input": f"input {i}" if i % 2 else "",
                "output": f"Output for {prefix.lower()} {i}."}
        if extra:
            item.update(extra(i))
        items.append(item)
    path.write_text(json.dumps(items), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
