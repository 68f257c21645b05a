"""The answer cache's group commit: every answer durable before its waiter goes on, fewer fsyncs."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
from pathlib import Path

import pytest
from cache_workers import open_store_read
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
        assert release.wait(60)
        commits.append(len(rows))
        put_many(rows)

    cache.put_many = slow_put_many  # type: ignore[method-assign]
    writer = GroupCommitter(cache)
    keys = [request_key("m", [{"role": "user", "content": str(i)}], {}) for i in range(300)]
    futures = [writer.submit(k, "m", {"i": i}, _answer(i)) for i, k in enumerate(keys)]
    release.set()
    for f in futures:
        f.result(timeout=60)
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
        bad.result(timeout=60)
    ok = writer.submit("k2", "m", {}, _answer(2))
    ok.result(timeout=60)
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


def test_twenty_runs_open_one_new_cache_at_once(tmp_path: Path) -> None:
    """20 processes released together by a barrier each open the same new cache, store and read.

    Before the retry, switching the new file to WAL failed with "database is locked" in about
    half of such rounds; three rounds make a regression all but certain to show.
    """
    ctx = multiprocessing.get_context("forkserver")  # cheap children, no fork of pytest's threads
    for round_ in range(3):
        path = tmp_path / f"round{round_}" / "answers.sqlite"
        barrier, results = ctx.Barrier(20), ctx.Queue()
        procs = [ctx.Process(target=open_store_read, args=(str(path), i, barrier, results)) for i in range(20)]
        for p in procs:
            p.start()
        outcomes = dict(results.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(60)
        failed = {i: why for i, why in outcomes.items() if why != "ok"}
        assert not failed, f"round {round_}: {len(failed)}/20 failed: {failed}"
        cache = AnswerCache(path)
        assert len(cache) == 20 and cache.get("key-7") == CachedAnswer("answer 7", "stop", 7, 1)
        cache.close()


def test_a_locked_new_cache_is_retried_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock errors a concurrent start causes (busy handler not consulted) are retried.

    The 20-process test shows the race only when the processes really overlap, which a loaded
    machine may not give; this one injects the errors, so it fails every time retrying breaks.
    """
    real_connect = sqlite3.connect
    failed: list[str] = []

    class Contended(sqlite3.Connection):
        def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
            for what in ("journal_mode=WAL", "CREATE TABLE"):
                if what in sql and what not in failed:
                    failed.append(what)  # the first try of each, as when another run holds the lock
                    raise sqlite3.OperationalError("database is locked")
            return super().execute(sql, *args)

    monkeypatch.setattr(sqlite3, "connect", lambda *a, **kw: real_connect(*a, **kw, factory=Contended))
    cache = AnswerCache(tmp_path / "new.sqlite")
    assert failed == ["journal_mode=WAL", "CREATE TABLE"]
    cache.put("k", "m", {}, _answer(1))
    assert cache.get("k") == _answer(1)
    cache.close()
    monkeypatch.undo()
    db = real_connect(tmp_path / "new.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_a_cache_that_is_not_a_database_is_one_clear_error(
    tmp_path: Path, server, capsys: pytest.CaptureFixture[str]
) -> None:
    srv = server()
    inp = write_alpaca(tmp_path / "in.json", 3)
    cache = tmp_path / "cache.sqlite"
    cache.write_bytes(b"this is not a database, it is a text file that was put here by mistake\n" * 20)
    rc = score_main([str(inp), "-o", str(tmp_path / "out.jsonl"), "--base-url", srv.base_url,
                     "--cache", str(cache), *FAST])
    err = capsys.readouterr().err
    assert rc == 1 and f"cannot open the answer cache {cache}" in err and "--cache" in err
    assert srv.entries() == [] and not (tmp_path / "out.jsonl").exists()
