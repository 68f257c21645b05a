"""--batch against the fake Batch API: equal to a live run, failures re-sent, re-attach after a
SIGKILL, --batch-export/--batch-import, and the dry run's live/batch cost table."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import FAST, STAGE3, read_jsonl, server_factory, write_alpaca
from fake_batches import FakeBatches
from fake_openai import completion
from phased_tools.asker import redactor
from phased_tools.batch_api import BatchClient
from phased_tools.client_config import ClientConfig
from phased_tools.judge import main as judge_main
from phased_tools.records import load_records
from phased_tools.score import main as score_main
from test_judge import make_files
from test_retired_model import assert_retired_message

BATCH = ["--batch", "--batch-poll", "0.01"]


@pytest.fixture
def batches(secret: str) -> Iterator[Callable[..., FakeBatches]]:
    """Factory: batches(**options) starts a FakeBatches that checks the key."""
    yield from server_factory(FakeBatches, secret)


def score(tmp: Path, srv, inp: Path, out: str, *extra: str, cache: str = "cache.sqlite") -> int:
    return score_main([str(inp), "-o", str(tmp / out), "--base-url", srv.base_url,
                       "--cache", str(tmp / cache), *FAST, *extra])


def live_reference(server, tmp: Path, inp: Path) -> list[dict]:
    """What a fault-free live run writes for `inp` (its own cache)."""
    assert score(tmp, server(), inp, "reference.jsonl", cache="reference.sqlite") == 0
    return read_jsonl(tmp / "reference.jsonl")


def test_batch_score_equals_live_and_splits(server, batches, tmp_path: Path, capsys) -> None:
    inp = write_alpaca(tmp_path / "in.json", 40)
    live = server(fault_rate=0.2, faults=("unparseable",))  # re-asks in both runs
    assert score(tmp_path, live, inp, "live.jsonl", cache="live.sqlite") == 0
    srv = batches(unparseable_rate=0.2, max_batch_requests=15)
    capsys.readouterr()
    assert score(tmp_path, srv, inp, "batch.jsonl", *BATCH, "--batch-max-requests", "15") == 0
    assert read_jsonl(tmp_path / "batch.jsonl") == read_jsonl(tmp_path / "live.jsonl")
    reasks = sum(len(json.loads(x)["body"]["messages"]) > 2 for f in srv.files.values()
                 for x in f.splitlines() if b'"custom_id"' in x and b'"method"' in x)
    assert 0 < reasks < 40
    assert srv.count("POST", "/v1/batches") == 3 + -(-reasks // 15)  # 40 split by 15, then the re-asks
    assert srv.entries() == []  # not one live request
    err = capsys.readouterr().err
    assert "batches created 4" in err and "at batch prices (x0.5)" in err
    # a second batch run finds everything cached and creates nothing
    assert score(tmp_path, srv, inp, "again.jsonl", *BATCH) == 0
    assert srv.count("POST", "/v1/batches") == 4 and read_jsonl(tmp_path / "again.jsonl") == read_jsonl(tmp_path / "live.jsonl")


def test_batch_judge_equals_live(server, batches, tmp_path: Path) -> None:
    sys_file, base_file = make_files(tmp_path)
    outputs = {}
    for name, srv, extra in (("live", server(), []), ("batch", batches(), BATCH)):
        assert judge_main(["--system", str(sys_file), "--baseline", str(base_file), "-o", str(tmp_path / name),
                           "--base-url", srv.base_url, "--cache", str(tmp_path / f"{name}.sqlite"),
                           *FAST, *extra]) == 0
        outputs[name] = (read_jsonl(tmp_path / name / "judgments.jsonl"),
                         json.loads((tmp_path / name / "winrate.json").read_text()))
    assert outputs["batch"] == outputs["live"]


def test_failures_and_expired_batch_are_resent(server, batches, tmp_path: Path) -> None:
    inp = write_alpaca(tmp_path / "in.json", 30)
    srv = batches(error_rate=0.3, expire_first=1)
    assert score(tmp_path, srv, inp, "out.jsonl", *BATCH) == 0
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert len(rows) == 30 and not (tmp_path / "out.jsonl.failed.jsonl").exists()
    assert srv.batches["batch_1"]["status"] == "expired" and srv.count("POST", "/v1/batches") >= 2
    sent = [json.loads(x)["custom_id"] for f in srv.files.values() for x in f.splitlines() if b'"method"' in x]
    assert len(sent) > 30 and len(set(sent)) == 30  # some re-sent, nothing answered twice
    assert rows == live_reference(server, tmp_path, inp)


def test_fallback_live_and_exhausted_rounds(server, batches, tmp_path: Path) -> None:
    inp = write_alpaca(tmp_path / "in.json", 20)
    srv = batches(error_rate=0.5)
    assert score(tmp_path, srv, inp, "out.jsonl", *BATCH, "--batch-retries", "0", "--reask", "0",
                 "--batch-fallback", "live") == 0
    assert srv.count("POST", "/v1/batches") == 1
    live = len([e for e in srv.entries() if e.get("answered")])
    assert 0 < live < 20 and len(read_jsonl(tmp_path / "out.jsonl")) == 20
    # without the fallback and no follow-up batch, the errored items are failed (exit 3), with the reason
    srv2 = batches(error_rate=0.5)
    assert score(tmp_path, srv2, inp, "out2.jsonl", *BATCH, "--batch-retries", "0", "--reask", "0",
                 cache="c2.sqlite") == 3
    failed = read_jsonl(tmp_path / "out2.jsonl.failed.jsonl")
    assert failed and all("HTTP 500" in f["error"] for f in failed) and srv2.entries() == []


def test_sigkill_while_waiting_then_restart_reattaches(server, batches, tmp_path: Path) -> None:
    inp = write_alpaca(tmp_path / "in.json", 25)
    srv = batches(hold_batches=True)
    cache, out = tmp_path / "cache.sqlite", tmp_path / "out.jsonl"
    args = [sys.executable, "-m", "phased_tools.score", str(inp), "-o", str(out), "--base-url", srv.base_url,
            "--cache", str(cache), *FAST, *BATCH, "--batch-max-requests", "10"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        srv.wait_polled()  # the first poll comes after every batch was created and recorded
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    created = srv.count("POST", "/v1/batches")
    assert created == 3 and srv.count("POST", "/v1/files") == 3
    srv.release_batches()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    assert srv.count("POST", "/v1/batches") == created and srv.count("POST", "/v1/files") == 3
    assert srv.entries() == []
    assert read_jsonl(out) == live_reference(server, tmp_path, inp)


@pytest.mark.parametrize("killed_at", ["/v1/batches", "/v1/files"])
def test_killed_before_the_batch_id_is_recorded_pays_once(server, batches, tmp_path: Path, killed_at) -> None:
    """A SIGKILL after the first create (or upload) took effect, before its reply: the restart
    finds the batch by its metadata token (or learns it was never created) and sends each item once."""
    inp = write_alpaca(tmp_path / "in.json", 25)
    procs: list[subprocess.Popen] = []

    def kill_first(method: str, path: str) -> None:
        if path == killed_at and not kill_first.done:  # type: ignore[attr-defined]
            kill_first.done = True  # type: ignore[attr-defined]
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait()
    kill_first.done = False  # type: ignore[attr-defined]
    srv = batches(on_call=kill_first)
    out = tmp_path / "out.jsonl"
    args = [sys.executable, "-m", "phased_tools.score", str(inp), "-o", str(out), "--base-url", srv.base_url,
            "--cache", str(tmp_path / "cache.sqlite"), *FAST, *BATCH, "--batch-max-requests", "10"]
    procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    assert procs[0].wait(timeout=120) == -signal.SIGKILL and not out.exists()
    assert srv.count("POST", "/v1/batches") == (killed_at == "/v1/batches")
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    assert srv.count("GET", "/v1/batches") >= 1  # the restart looked for its intent's batch
    assert srv.count("POST", "/v1/batches") == 3 and srv.entries() == []
    sent = [json.loads(x)["custom_id"] for b in srv.batches.values()
            for x in srv.files[b["input_file_id"]].splitlines()]
    assert len(sent) == 25 and len(set(sent)) == 25  # every item in exactly one created batch
    assert read_jsonl(out) == live_reference(server, tmp_path, inp)


def test_find_tokens_pages_through_the_batch_list(batches, secret: str) -> None:
    srv = batches()
    for i in range(250):  # three pages of 100, newest first
        srv._create({"endpoint": "/v1/chat/completions", "input_file_id": "f", "completion_window": "24h",
                     "metadata": {"phased_token": f"t{i}"}})
    api = BatchClient(ClientConfig(base_url=srv.base_url, max_retries=0), secret, redactor(secret))
    try:
        assert api.find_tokens({"t3", "t200"}, since=0) == {"t3": "batch_4", "t200": "batch_201"}
        assert api.find_tokens({"gone"}, since=0) == {}
    finally:
        api.close()
    assert srv.count("GET", "/v1/batches") == 6


@pytest.mark.parametrize("at_create", [False, True])
def test_retired_model_in_batch_mode_stops_with_one_line(batches, tmp_path: Path, capsys, at_create) -> None:
    srv = batches(missing_models=("gpt-4-0613",), missing_model_at_create=at_create)
    inp = write_alpaca(tmp_path / "in.json", 6)
    capsys.readouterr()
    assert score(tmp_path, srv, inp, "out.jsonl", *BATCH) == 1 and not (tmp_path / "out.jsonl").exists()
    err = capsys.readouterr().err
    assert err.startswith("phased-score: error: ")
    assert_retired_message(err, "gpt-4-0613")
    assert srv.count("POST", "/v1/batches") == 1 and srv.entries() == []  # no follow-up batch, no live request


def run_batch_file(requests: Path, output: Path) -> None:
    """What vLLM's run-batch does with the exported file, with the fake server's answers."""
    lines = []
    for i, text in enumerate(requests.read_text(encoding="utf-8").splitlines()):
        req = json.loads(text)
        assert set(req) == {"custom_id", "method", "url", "body"} and req["url"] == "/v1/chat/completions"
        lines.append({"id": f"vllm-{i}", "custom_id": req["custom_id"], "error": None,
                      "response": {"status_code": 200, "request_id": f"r{i}",
                                   "body": completion(req["body"], None, req["custom_id"], time.time())}})
    output.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")


def test_export_import_round_trip_then_live_run_sends_nothing(server, tmp_path: Path, capsys) -> None:
    inp = write_alpaca(tmp_path / "in.json", 12)
    srv = server()
    exported, answered = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    assert score(tmp_path, srv, inp, "out.jsonl", "--batch-export", str(exported)) == 0
    assert len(exported.read_text().splitlines()) == 12 and not (tmp_path / "out.jsonl").exists()
    run_batch_file(exported, answered)
    assert score(tmp_path, srv, inp, "out.jsonl", "--batch-import", str(answered)) == 0
    assert "stored 12 answers" in capsys.readouterr().err
    assert score(tmp_path, srv, inp, "out.jsonl", "--batch-export", str(exported)) == 0
    assert exported.read_text() == ""  # nothing left to send
    assert score(tmp_path, srv, inp, "out.jsonl") == 0
    assert srv.entries() == []  # every answer came from the import
    assert read_jsonl(tmp_path / "out.jsonl") == live_reference(server, tmp_path, inp)


@pytest.mark.parametrize("content,where", [
    ('{"custom_id": "k", "response": null, "error": {"code": "x", "message": "y"}}\n[1, 2]\n', ":2:"),
    ('{"custom_id": "k"}\n', ":1:"),
    ('{"custom_id": "k", "response": {"status_code": 200, "body": {}}}\n{"custom_id": 3}\n', ":2:"),
    ("not json\n", ":1:"),
])
def test_import_of_a_malformed_file_names_file_and_line(server, tmp_path: Path, capsys, content, where) -> None:
    inp = write_alpaca(tmp_path / "in.json", 3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    assert score(tmp_path, server(), inp, "out.jsonl", "--batch-import", str(bad)) == 2
    err = capsys.readouterr().err
    assert f"{bad}{where}" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_batch_key_never_written(batches, tmp_path: Path, secret: str, capsys) -> None:
    inp = write_alpaca(tmp_path / "in.json", 8)
    srv = batches(error_rate=0.2)
    assert score(tmp_path, srv, inp, "out.jsonl", *BATCH, "--batch-export", str(tmp_path / "x.jsonl")) == 0
    assert score(tmp_path, srv, inp, "out.jsonl", *BATCH) == 0
    captured = capsys.readouterr()
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert secret.encode() not in p.read_bytes(), p
    assert all(secret.encode() not in f for f in srv.files.values())
    assert secret not in captured.out + captured.err


def test_dry_run_prints_live_and_batch_costs(server, tmp_path: Path, capsys) -> None:
    inp = write_alpaca(tmp_path / "in.json", 10)
    assert score(tmp_path, server(), inp, "out.jsonl", "--dry-run") == 0
    out = capsys.readouterr().out
    table = {line.split()[0]: line.split()[1:] for line in out.splitlines()[-4:]}
    assert table["price"] == ["in/out", "30/60", "15/30"]
    live, batch = (float(x.strip("$").replace(",", "")) for x in table["total"])
    assert live > 0 and batch == pytest.approx(live / 2, abs=0.01)


@pytest.mark.skipif(not STAGE3.exists(), reason="shared data not available")
def test_dry_run_at_alpaca_52k_size(tmp_path: Path, capsys) -> None:
    """The benchmark's cost table: 52,002 records (the stage-3 rows repeated) at the paper's settings."""
    recs, _ = load_records(STAGE3)
    items = [{"instruction": f"{recs[i % len(recs)].instruction} ({i})", "input": recs[i % len(recs)].input,
              "output": recs[i % len(recs)].output} for i in range(52_002)]
    inp = tmp_path / "alpaca52k.json"
    inp.write_text(json.dumps(items), encoding="utf-8")
    t0 = time.monotonic()
    assert score_main([str(inp), "-o", str(tmp_path / "o.jsonl"), "--dry-run", "--cache", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "52,002 records" in out and "batch" in out and time.monotonic() - t0 < 120
    print(out, file=sys.stderr)
