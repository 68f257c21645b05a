"""A server never reached (connection refused, unknown host) stops both tools at once with one
line naming the URL, and writes nothing; a server that drops mid-run is still retried."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import FAST, read_jsonl, write_alpaca
from phased_tools.judge import main as judge_main
from phased_tools.score import main as score_main
from test_judge import make_files

LIMIT_S = 10.0  # the bound on the time to the error, with the default settings


def closed_port_url() -> str:
    """A /v1 URL on 127.0.0.1 where nothing listens (a port just freed), so connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def cli(tool: str, *args: str) -> tuple[int, str, float]:
    """Run `python -m phased_tools.<tool>` with the default settings: exit status, stderr, seconds."""
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", f"phased_tools.{tool}", *args], capture_output=True,
                          timeout=120)
    return done.returncode, done.stderr.decode(), time.monotonic() - t0  # \r kept as written


@pytest.fixture(scope="module")
def startup() -> float:
    """Seconds the CLI takes to start and exit (`--help`) on this machine now: a loaded 2-core
    box spends several on imports alone, which is not the time spent reaching the server."""
    return cli("score", "--help")[2]


def assert_one_line(err: str, prog: str, url: str, why: str) -> None:
    """The only line on stderr (a progress bar at 0 is erased with \\r, never a line of its own)."""
    assert "Traceback" not in err and err.count("\n") == 1, err
    line = err.split("\r")[-1]
    assert line.startswith(f"{prog}: error: cannot reach {url} ({why}") and "--base-url" in line, err
    assert "time-out" not in err and "failed" not in err


def test_score_connection_refused_stops_at_once(secret: str, tmp_path: Path, startup: float) -> None:
    url = closed_port_url()
    inp = write_alpaca(tmp_path / "in.json", 50)
    out = tmp_path / "scored.jsonl"
    out.write_text("an earlier run's output\n", encoding="utf-8")
    rc, err, took = cli("score", str(inp), "-o", str(out), "--base-url", url)
    assert rc == 1 and took - startup < LIMIT_S, (rc, took, startup, err)
    assert_one_line(err, "phased-score", url, "connection refused")
    assert out.read_text(encoding="utf-8") == "an earlier run's output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.json", "scored.jsonl", "xdg"]


def test_judge_connection_refused_stops_at_once(secret: str, tmp_path: Path, startup: float) -> None:
    url = closed_port_url()
    sys_file, base_file = make_files(tmp_path)
    rc, err, took = cli("judge", "--system", str(sys_file), "--baseline", str(base_file),
                        "-o", str(tmp_path / "out"), "--base-url", url)
    assert rc == 1 and took - startup < LIMIT_S, (rc, took, startup, err)
    assert_one_line(err, "phased-judge", url, "connection refused")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unknown_host_stops_at_once(secret: str, tmp_path: Path, capsys) -> None:
    host = "phased-tools-test.invalid"  # RFC 2606: never resolves
    t0 = time.monotonic()
    try:
        socket.getaddrinfo(host, 80)
        pytest.skip(f"this resolver answers for {host}")
    except socket.gaierror:
        if time.monotonic() - t0 > 2.0:
            pytest.skip("this machine's resolver is too slow to fail for a timed test")
    url = f"http://{host}/v1"
    inp = write_alpaca(tmp_path / "in.json", 10)
    out = tmp_path / "scored.jsonl"
    t0 = time.monotonic()
    assert score_main([str(inp), "-o", str(out), "--base-url", url]) == 1
    assert time.monotonic() - t0 < LIMIT_S
    assert_one_line(capsys.readouterr().err, "phased-score", url, "host name not found")
    assert not out.exists() and not (tmp_path / "scored.jsonl.failed.jsonl").exists()


@pytest.mark.parametrize("tool", ["score", "judge"])
def test_batch_first_call_refused_stops_at_once(secret: str, tmp_path: Path, capsys, tool: str) -> None:
    url = closed_port_url()
    t0 = time.monotonic()
    if tool == "score":
        inp = write_alpaca(tmp_path / "in.json", 10)
        rc = score_main([str(inp), "-o", str(tmp_path / "scored.jsonl"), "--base-url", url, "--batch"])
    else:
        sys_file, base_file = make_files(tmp_path)
        rc = judge_main(["--system", str(sys_file), "--baseline", str(base_file), "-o", str(tmp_path / "out"),
                         "--base-url", url, "--batch"])
    assert rc == 1 and time.monotonic() - t0 < LIMIT_S
    assert_one_line(capsys.readouterr().err, f"phased-{tool}", url, "connection refused")
    assert not (tmp_path / "scored.jsonl").exists() and not (tmp_path / "out").exists()


def test_server_dropping_mid_run_is_retried(server, tmp_path: Path, capsys) -> None:
    """3 answers, then the server goes down (the parked request hung up on, new connections
    refused) and comes back on the same port: the run retries through it and scores everything."""
    srv = server(hold_after=3)
    inp = write_alpaca(tmp_path / "in.json", 6)
    out = tmp_path / "scored.jsonl"
    rc: list[int] = []
    args = [str(inp), "-o", str(out), "--base-url", srv.base_url, "--cache", str(tmp_path / "c.sqlite"),
            *FAST, "--concurrency", "1", "--max-retries", "100"]
    run = threading.Thread(target=lambda: rc.append(score_main(args)))
    run.start()
    try:
        srv.wait_held(1)
        srv.drop()
        time.sleep(1.0)  # down for a while: every attempt meanwhile is refused (backoff <= 0.1 s)
        server(port=srv.bound_port)
    finally:
        run.join(120)
    assert rc == [0]
    assert len(read_jsonl(out)) == 6 and not (tmp_path / "scored.jsonl.failed.jsonl").exists()
    err = capsys.readouterr().err
    retried = re.search(r"connection x(\d+)", err)
    assert retried and int(retried.group(1)) >= 3, err
    assert "timeout x" not in err  # a refusal or a hang-up is no time-out (aiohttp calls it one)


@pytest.mark.parametrize("main", [score_main, judge_main])
def test_help_names_the_key_sent_without_openai_api_key(main, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "no $OPENAI_API_KEY, the key 'EMPTY' is sent" in text
    assert "server unreachable" in text
