"""SIGKILL mid-run then resume; and the API key never lands in any output, cache, log or message."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from conftest import FAST, HANG_TIMEOUT, read_jsonl, write_alpaca
from fake_openai import item_hash
from phased_tools.score import main as score_main


def cli(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"phased_tools.{module}", *args]


def cached_requests(cache: Path) -> set[tuple[int, int]]:
    """(item, number of messages) of every request with an answer in the cache.

    The item is the server's hash of the first user message; the message count tells a first
    request from its re-asks.
    """
    db = sqlite3.connect(f"file:{cache}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT request FROM answers").fetchall()
    finally:
        db.close()
    out = set()
    for (req,) in rows:
        msgs = json.loads(req)["messages"]
        out.add((item_hash(next(m["content"] for m in msgs if m["role"] == "user")), len(msgs)))
    return out


def requests_seen(entries: list[dict]) -> set[tuple[int, int]]:
    return {(e["item"], e["n_messages"]) for e in entries if "item" in e}


def test_sigkill_then_resume_resends_nothing_answered(server, tmp_path: Path) -> None:
    n, conc, served = 400, 8, 150
    inp = write_alpaca(tmp_path / "in.json", n)
    cache, out = tmp_path / "cache.sqlite", tmp_path / "out.jsonl"
    # The server parks every request after the first `served`: once all `conc` workers wait
    # there, every answer they received is committed and the run cannot finish, so the kill
    # lands mid-run at a known point on any machine.
    srv = server(fault_rate=0.1, faults=("500", "unparseable"), hold_after=served)
    args = cli("score", str(inp), "-o", str(out), "--base-url", srv.base_url, "--cache", str(cache),
               "--concurrency", str(conc), *FAST)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        srv.wait_held(conc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    srv.release_held()
    srv.wait_idle()
    before = srv.entries()
    have = cached_requests(cache)  # what the killed run had stored
    items = {i for i, _ in have}
    assert served * 2 // 3 <= len(items) < n
    assert not out.exists()  # the output is only written, atomically, at the end
    answered_before = requests_seen([e for e in before if e.get("answered")])

    srv.reset_log()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = srv.entries()
    resent = requests_seen(after)
    assert not (resent & have), "a request answered and stored before the kill was sent again"
    # answered by the server but lost in flight at the kill: at most the requests in flight
    assert len(resent & answered_before) <= conc
    every = {i for i, _ in requests_seen(before)} | {i for i, _ in resent}
    assert len(every) == n and every - items <= {i for i, _ in resent}

    # the result equals an uninterrupted run's
    ref = tmp_path / "ref.jsonl"
    srv2 = server()
    assert score_main([str(inp), "-o", str(ref), "--base-url", srv2.base_url,
                       "--cache", str(tmp_path / "ref.sqlite"), "--concurrency", "32", *FAST]) == 0
    assert read_jsonl(out) == read_jsonl(ref)


def test_api_key_never_written_anywhere(server, tmp_path: Path, secret: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    inp = write_alpaca(work / "in.json", 30)
    cache = work / "cache.sqlite"
    env = {**os.environ, "OPENAI_API_KEY": secret, "OPENAI_LOG": "debug"}
    logs: list[bytes] = []

    def go(*args: str) -> int:
        p = subprocess.run(args, env=env, capture_output=True, timeout=120)
        logs.extend([p.stdout, p.stderr])
        return p.returncode

    srv = server(fault_rate=0.3)  # a hung request waits until the server stops
    assert go(*cli("score", str(inp), "-o", str(work / "out.jsonl"), "--base-url", srv.base_url,
                   "--cache", str(cache), *FAST, "--timeout", HANG_TIMEOUT)) == 0
    # judge: answers files made from the scored output
    rows = read_jsonl(work / "out.jsonl")
    for name, suffix in (("a", " A"), ("b", " B")):
        (work / f"{name}.jsonl").write_text("".join(
            json.dumps({"test_set": "t", "id": str(i), "instruction": r["instruction"], "input": r["input"],
                        "output": r["output"] + suffix}) + "\n" for i, r in enumerate(rows)))
    assert go(*cli("judge", "--system", str(work / "a.jsonl"), "--baseline", str(work / "b.jsonl"),
                   "-o", str(work / "judged"), "--base-url", srv.base_url, "--cache", str(cache), *FAST,
                   "--timeout", HANG_TIMEOUT)) == 0
    # a server that rejects the key and echoes it back in its error message
    bad = server(api_key="sk-something-else")
    other = write_alpaca(work / "other.json", 3, prefix="Other")
    assert go(*cli("score", str(other), "-o", str(work / "bad.jsonl"), "--base-url", bad.base_url,
                   "--cache", str(cache), *FAST)) == 1
    assert any(b"authentication failed" in x for x in logs)
    assert [e["status"] for e in bad.entries()][:1] == [401]  # the server echoed the key it got
    files = [p for p in work.rglob("*") if p.is_file()]
    assert {"out.jsonl", "cache.sqlite", "winrate.md", "winrate.png", "judgments.jsonl"} <= {p.name for p in files}
    for p in files:
        assert secret.encode() not in p.read_bytes(), f"key found in {p}"
    for i, blob in enumerate(logs):
        assert secret.encode() not in blob, f"key found in captured output #{i}"
