"""A model the server does not know (retired, or misspelt): one line that says what to do."""

from __future__ import annotations

from pathlib import Path

from conftest import FAST, write_alpaca
from phased_tools.judge import main as judge_main
from phased_tools.score import main as score_main
from test_judge import make_files


def assert_retired_message(err: str, model: str) -> None:
    assert "Traceback" not in err and err.count("\n") == 1
    assert f"model {model!r}" in err and "may be retired" in err
    assert "--model" in err and "--base-url" in err and "vLLM" in err


def test_score_stops_with_one_line(server, tmp_path: Path, capsys) -> None:
    srv = server(missing_models=("gpt-4-0613",))
    inp = write_alpaca(tmp_path / "in.json", 20)
    out = tmp_path / "scored.jsonl"
    rc = score_main([str(inp), "-o", str(out), "--base-url", srv.base_url, "--cache", str(tmp_path / "c.sqlite"), *FAST])
    assert rc == 1 and not out.exists()
    err = capsys.readouterr().err
    assert err.startswith("phased-score: error: ")
    assert_retired_message(err, "gpt-4-0613")


def test_judge_stops_with_one_line(server, tmp_path: Path, capsys) -> None:
    srv = server(missing_models=("gpt-4-0613",))
    sys_file, base_file = make_files(tmp_path)
    rc = judge_main(["--system", str(sys_file), "--baseline", str(base_file), "-o", str(tmp_path / "out"),
                     "--base-url", srv.base_url, "--cache", str(tmp_path / "c.sqlite"), *FAST])
    assert rc == 1 and not (tmp_path / "out" / "winrate.md").exists()
    err = capsys.readouterr().err
    assert err.startswith("phased-judge: error: ")
    assert_retired_message(err, "gpt-4-0613")
    assert all(e["status"] == 404 for e in srv.entries())
    # another model on the same server works
    assert judge_main(["--system", str(sys_file), "--baseline", str(base_file), "-o", str(tmp_path / "out"),
                       "--base-url", srv.base_url, "--cache", str(tmp_path / "c.sqlite"), "--model", "gpt-4o",
                       *FAST]) == 0
