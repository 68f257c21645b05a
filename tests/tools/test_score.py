"""phased-score against the fake server: faults, retries, re-asks, limits, cache, errors."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest
from conftest import FAST, HANG_TIMEOUT, read_jsonl, write_alpaca
from fake_openai import NEVER_PARSEABLE, expected_score
from phased_tools.chat import ParseError
from phased_tools.records import load_records
from phased_tools.score import load_template, main, parse_score


def run(tmp: Path, srv, inp: Path, out: str, *extra: str, cache: str = "cache.sqlite") -> int:
    return main([str(inp), "-o", str(tmp / out), "--base-url", srv.base_url,
                 "--cache", str(tmp / cache), *FAST, *extra])


@pytest.mark.parametrize("reply,value", [("4", 4.0), ("3.5\nbecause", 3.5), ("Score: 2", 2.0),
                                         ("**4.25**", 4.25), ("4/5", 4.0), ("\n 5 \n", 5.0), ("1.", 1.0)])
def test_parse_score_ok(reply: str, value: float) -> None:
    assert parse_score(reply) == value


@pytest.mark.parametrize("reply", ["", "hard", "7", "0.5", "Score: maybe 3", "3 or 4", "4\n", "-1"][:-2] + ["0", "6"])
def test_parse_score_rejects(reply: str) -> None:
    with pytest.raises(ParseError):
        parse_score(reply)


def test_faults_20_percent_equal_fault_free(server, tmp_path: Path) -> None:
    inp = write_alpaca(tmp_path / "in.json", 500)
    clean = server()
    assert run(tmp_path, clean, inp, "clean.jsonl", "--concurrency", "32", cache="clean.sqlite") == 0
    faulty = server(fault_rate=0.2, retry_after="0.05")
    assert run(tmp_path, faulty, inp, "faulty.jsonl", "--concurrency", "32", "--timeout", HANG_TIMEOUT) == 0
    a, b = read_jsonl(tmp_path / "clean.jsonl"), read_jsonl(tmp_path / "faulty.jsonl")
    assert len(a) == len(b) == 500 and a == b
    assert not (tmp_path / "faulty.jsonl.failed.jsonl").exists()
    kinds = {e["fault"] for e in faulty.entries() if e.get("fault")}
    assert kinds == {"429", "500", "hang", "malformed", "unparseable", "out_of_range"}
    faulted_items = {e["item"] for e in faulty.entries() if e.get("fault")}
    assert 70 <= len(faulted_items) <= 130  # ~20% of 500
    # Every record kept its fields and got a score in [1, 5] that matches the server's rule.
    tpl = load_template()
    records, _ = load_records(inp)
    for rec, row in zip(records, b, strict=True):
        assert row["instruction"] == rec.instruction and row["output"] == rec.output
        assert row["score"] == expected_score(tpl.render(rec)[1]["content"])
        assert row["score_raw"] == f"{row['score']:g}"
        assert row["scorer"]["model"] == "gpt-4-0613" and row["scorer"]["template"] == "difficulty"


def test_unfixable_items_are_listed_as_failed(server, tmp_path: Path, capsys) -> None:
    inp = write_alpaca(tmp_path / "in.json", 12,
                       extra=lambda i: {"instruction": f"{NEVER_PARSEABLE} {i}"} if i % 4 == 0 else {})
    srv = server(fault_rate=1.0, faults=("500",))
    rc = run(tmp_path, srv, inp, "out.jsonl", "--reask", "2")
    assert rc == 3
    out = read_jsonl(tmp_path / "out.jsonl")
    failed = read_jsonl(tmp_path / "out.jsonl.failed.jsonl")
    assert len(out) == 9 and len(failed) == 3
    for row in failed:
        assert NEVER_PARSEABLE in row["record"]["instruction"]
        assert "first line is not a score" in row["error"] and "after 3 replies" in row["error"]
        assert len(row["replies"]) == 3 and row["score_raw"] == "I would rather not give a number."
        assert row["scorer"]["model"] == "gpt-4-0613"  # the model whose replies these are
    # re-asks are real follow-up turns: 3 conversations per failed item
    never = [e for e in srv.entries() if e["status"] == 200 and e["n_messages"] > 2]
    assert len(never) == 3 * 2
    assert "scored 9, failed 3" in capsys.readouterr().err


def test_exhausted_retries_fail_then_rerun_sends_only_the_missing(server, tmp_path: Path) -> None:
    inp = write_alpaca(tmp_path / "in.json", 40)
    srv = server(fault_rate=0.25, faults=("500",))
    assert run(tmp_path, srv, inp, "out.jsonl", "--max-retries", "0") == 3
    failed = read_jsonl(tmp_path / "out.jsonl.failed.jsonl")
    assert failed and all(r["error"].startswith("HTTP 500") for r in failed)
    assert all("gave up after 1 attempts" in r["error"] for r in failed)
    srv.reset_log()
    assert run(tmp_path, srv, inp, "out.jsonl") == 0
    assert len(srv.entries()) == len(failed)  # only the unanswered items were sent again
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 40
    assert not (tmp_path / "out.jsonl.failed.jsonl").exists()
    srv.reset_log()
    assert run(tmp_path, srv, inp, "again.jsonl") == 0
    assert srv.entries() == []  # all cached: never pays twice


def test_retry_after_is_honoured(server, tmp_path: Path) -> None:
    inp = write_alpaca(tmp_path / "in.json", 3)
    srv = server(fault_rate=1.0, faults=("429",), retry_after="1")
    t0 = time.monotonic()
    assert run(tmp_path, srv, inp, "out.jsonl", "--max-backoff", "0.01") == 0
    assert time.monotonic() - t0 >= 1.0
    by_item: dict[int, list[float]] = {}
    for e in srv.entries():
        by_item.setdefault(e["item"], []).append(e["t_in"])
    for times in by_item.values():
        assert len(times) == 2 and times[1] - times[0] >= 0.95


def test_hung_responses_time_out_and_retry(server, tmp_path: Path) -> None:
    inp = write_alpaca(tmp_path / "in.json", 6)
    srv = server(fault_rate=1.0, faults=("hang",))  # every first attempt hangs until the server stops
    assert run(tmp_path, srv, inp, "out.jsonl", "--timeout", HANG_TIMEOUT) == 0
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 6
    # What the server saw, not what the clock implies: each item hung once, then was answered
    # by a retry (a loaded machine may add retries, never remove one).
    by_item: dict[int, list[dict]] = {}
    for e in sorted(srv.entries(), key=lambda e: e["attempt"]):
        by_item.setdefault(e["item"], []).append(e)
    assert len(by_item) == 6
    for seen in by_item.values():
        assert seen[0]["fault"] == "hang" and len(seen) >= 2
        assert any(e["status"] == 200 and e["answered"] for e in seen[1:])


def test_rpm_limit(server, tmp_path: Path) -> None:
    inp = write_alpaca(tmp_path / "in.json", 21)
    srv = server()
    assert run(tmp_path, srv, inp, "out.jsonl", "--rpm", "600", "--concurrency", "16") == 0
    t = sorted(e["t_in"] for e in srv.entries())
    assert t[-1] - t[0] >= 1.8  # 20 intervals of 0.1 s (burst of one)


def test_tpm_limit(server, tmp_path: Path) -> None:
    inp = write_alpaca(tmp_path / "in.json", 8)
    srv = server()
    # each request is about 250 prompt + 10 max tokens: 8 requests ~ 2,100 tokens at 60,000/min
    assert run(tmp_path, srv, inp, "out.jsonl", "--tpm", "60000", "--max-tokens", "10") == 0
    t = sorted(e["t_in"] for e in srv.entries())
    assert t[-1] - t[0] >= 1.2  # 7 waits of ~0.2 s each


def test_dry_run_sends_nothing(server, tmp_path: Path, capsys, monkeypatch) -> None:
    inp = write_alpaca(tmp_path / "in.json", 10)
    srv = server()
    monkeypatch.delenv("OPENAI_API_KEY")
    assert run(tmp_path, srv, inp, "out.jsonl", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "10 (0 already cached, 10 to send" in out and "estimated cost" in out and "$" in out
    assert srv.entries() == [] and not (tmp_path / "out.jsonl").exists()


def test_template_swap_and_existing_score(server, tmp_path: Path) -> None:
    tpl = tmp_path / "mine.txt"
    tpl.write_text("[system]\nRate it.\n[user]\nQ: {instruction} {input}\nA: {output}\n{literal} braces stay\n")
    inp = write_alpaca(tmp_path / "in.json", 3, extra=lambda i: {"score": "4\n\n", "id": str(i)})
    srv = server()
    assert run(tmp_path, srv, inp, "out.jsonl", "--template", str(tpl)) == 0
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert rows[0]["scorer"]["template"] == "mine" and rows[0]["score_input"] == "4\n\n"
    assert rows[0]["id"] == "0" and 1 <= rows[0]["score"] <= 5


def test_bad_input_names_file_and_line(server, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    srv = server()
    assert run(tmp_path, srv, bad, "out.jsonl") == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: not valid JSON" in err
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "a", "output": "b"}\n')
    assert run(tmp_path, srv, missing, "out.jsonl") == 2
    err = capsys.readouterr().err
    assert f"{missing}:1: missing field 'instruction'" in err and "--instruction-field" in err
    assert run(tmp_path, srv, missing, "out.jsonl", "--instruction-field", "prompt") == 0


def test_wrong_key_is_fatal_and_not_echoed(server, tmp_path: Path, capsys, secret: str) -> None:
    inp = write_alpaca(tmp_path / "in.json", 4)
    srv = server(api_key="sk-the-server-wants-another")
    assert run(tmp_path, srv, inp, "out.jsonl") == 1
    err = capsys.readouterr().err
    assert "authentication failed (HTTP 401)" in err and secret not in err


def test_help() -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


def test_output_is_jsonl_in_input_order(server, tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"q": f"q{i}", "a": f"a{i}", "id": i}) + "\n" for i in range(30)))
    srv = server(latency=0.0)
    assert run(tmp_path, srv, inp, "o.jsonl", "--instruction-field", "q", "--output-field", "a") == 0
    assert [r["id"] for r in read_jsonl(tmp_path / "o.jsonl")] == list(range(30))
    assert not [p for p in tmp_path.iterdir() if ".tmp." in p.name]


@pytest.mark.parametrize("http", ["httpx", "aiohttp"])
def test_both_transports_handle_every_fault(server, tmp_path: Path, http: str) -> None:
    if http == "aiohttp":
        pytest.importorskip("aiohttp", reason="openai's aiohttp transport is optional")
    inp = write_alpaca(tmp_path / "in.json", 60)
    srv = server(fault_rate=0.5)
    assert run(tmp_path, srv, inp, "out.jsonl", "--http", http, "--timeout", HANG_TIMEOUT) == 0
    tpl = load_template()
    records, _ = load_records(inp)
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["score"] for r in rows] == [expected_score(tpl.render(r)[1]["content"]) for r in records]
    assert {e["fault"] for e in srv.entries() if e.get("fault")} == {
        "429", "500", "hang", "malformed", "unparseable", "out_of_range"}


def test_unwritable_output_is_refused_before_any_request(server, tmp_path: Path, capsys) -> None:
    inp = write_alpaca(tmp_path / "in.json", 5)
    srv = server()
    (tmp_path / "taken").write_text("a file where a folder should be")
    cases = [
        (["-o", str(tmp_path)], f"-o: {tmp_path} is a folder; give a file path"),
        (["-o", str(tmp_path / "nodir" / "out.jsonl")], f"-o: folder {tmp_path / 'nodir'} does not exist"),
        (["-o", str(tmp_path / "taken" / "out.jsonl")], f"-o: folder {tmp_path / 'taken'} does not exist"),
        (["-o", str(tmp_path / "ok.jsonl"), "--failed", str(tmp_path)], f"--failed: {tmp_path} is a folder"),
    ]
    for args, message in cases:
        rc = main([str(inp), *args, "--base-url", srv.base_url, "--cache", str(tmp_path / "c.sqlite"), *FAST])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"phased-score: error: {message}") and err.count("\n") == 1, err
    assert srv.entries() == []  # nothing paid for
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name or "write-test" in p.name]
    assert not (tmp_path / "nodir").exists()


def test_a_failed_write_leaves_no_temp_file_and_the_answers_cached(
    server, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    inp = write_alpaca(tmp_path / "in.json", 5)
    srv = server()
    out = tmp_path / "out.jsonl"
    out.write_text("the previous run's output\n")

    def disk_full(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    with monkeypatch.context() as m:
        m.setattr(os, "replace", disk_full)
        assert run(tmp_path, srv, inp, "out.jsonl") == 1
    err = capsys.readouterr().err
    assert f"cannot write {out} (No space left on device)" in err and "run again" in err
    assert out.read_text() == "the previous run's output\n"  # the old output stays whole
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
    srv.reset_log()
    assert run(tmp_path, srv, inp, "out.jsonl") == 0
    assert srv.entries() == [] and len(read_jsonl(out)) == 5  # nothing paid for twice
