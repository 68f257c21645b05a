"""The answer cache's group commit: every answer durable before its waiter goes on, fewer fsyncs."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from conftest import FAST, write_alpaca
from phased_tools.cache import AnswerCache, CachedAnswer, GroupCommitter, request_key
from phased_tools.score import main as score_main


def _answer(i: int) -> CachedAnswer:
    return CachedAnswer(f"{i % 5 + 1}\nbecause", "stop", 10 + i, 2)


def test_group_commit_stores_every_answer_in_fewer_transactions(tmp_path: Path) -> None:
    cache = AnswerCache(tmp_path / "c.sqlite")
    commits: list[int] = []
    put_many = cache.put_many
    release = threading.Event()

    def slow_put_many(rows: list) -> None:  # the first commit waits, so the rest pile up
        release.wait(5)
        commits.append(len(rows))
        put_many(rows)

    cache.put_many = slow_put_many  # type: ignore[method-assign]
    writer = GroupCommitter(cache)
    keys = [request_key("m", [{"role": "user", "content": str(i)}], {}) for i in range(300)]
    futures = [writer.submit(k, "m", {"i": i}, _answer(i)) for i, k in enumerate(keys)]
    release.set()
    for f in futures:
        f.result(timeout=10)
    # Every waiter released means its row is committed: a fresh connection sees all of them.
    db = sqlite3.connect(tmp_path / "c.sqlite")
    assert db.execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 300
    db.close()
    assert sum(commits) == 300
    assert len(commits) < 300 / 10, commits  # grouped, not one transaction per answer
    assert cache.get(keys[7]) == _answer(7)
    writer.close()
    cache.close()


def test_failed_commit_reaches_every_waiter_and_the_writer_goes_on(tmp_path: Path) -> None:
    cache = AnswerCache(tmp_path / "c.sqlite")
    put_many = cache.put_many
    fail = threading.Event()
    fail.set()

    def flaky(rows: list) -> None:
        if fail.is_set():
            fail.clear()
            raise sqlite3.OperationalError("disk I/O error")
        put_many(rows)

    cache.put_many = flaky  # type: ignore[method-assign]
    writer = GroupCommitter(cache)
    bad = writer.submit("k1", "m", {}, _answer(1))
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        bad.result(timeout=10)
    ok = writer.submit("k2", "m", {}, _answer(2))
    ok.result(timeout=10)
    assert cache.get("k2") == _answer(2) and cache.get("k1") is None
    cancelled = writer.submit("k3", "m", {}, _answer(3))
    cancelled.cancel()  # its waiter gave up; the paid-for answer is still kept
    writer.close()
    assert cache.get("k3") == _answer(3)
    cache.close()


def test_rollback_keeps_a_failed_batch_out(tmp_path: Path) -> None:
    cache = AnswerCache(tmp_path / "c.sqlite")
    with pytest.raises(sqlite3.Error):
        cache.put_many([("k", "m", "{}", "a", None, 0, 0, 0.0), ("k2", "m")])  # second row malformed
    assert len(cache) == 0
    cache.put_many([("k", "m", "{}", "a", None, 0, 0, 0.0)])
    assert len(cache) == 1
    cache.close()


def test_a_failing_disk_stops_the_run_with_a_clear_error(
    tmp_path: Path, server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    srv = server()
    inp = write_alpaca(tmp_path / "in.json", 5)
    cache = tmp_path / "cache.sqlite"

    def disk_full(self: AnswerCache, rows: list) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(AnswerCache, "put_many", disk_full)
    rc = score_main([str(inp), "-o", str(tmp_path / "out.jsonl"), "--base-url", srv.base_url,
                     "--cache", str(cache), *FAST])
    err = capsys.readouterr().err
    assert rc == 1
    assert "cannot store answers in the cache" in err and str(cache) in err and "disk is full" in err
    assert not (tmp_path / "out.jsonl").exists()  # no output that claims answers it did not keep
