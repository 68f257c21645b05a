"""phased-judge end to end: the paper's rule through the real prompt, both orders, outputs."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest
from conftest import FAST, read_jsonl
from fake_openai import JUDGE_GARBLE
from phased_tools.judge import main
from phased_tools.judge_prompt import CRITERIA, judge_messages, parse_pair, question

SCORE = {"win": 7, "tie": 5, "lose": 3}  # the baseline always scores 5 in either position
COMBOS_A = [("win", "win"), ("win", "tie"), ("tie", "win"), ("tie", "tie"), ("win", "lose")]
COMBOS_B = [("lose", "win"), ("lose", "lose"), ("lose", "tie"), ("tie", "lose"), ("win", "win")]


def answers(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_files(tmp: Path) -> tuple[Path, Path]:
    sys_rows, base_rows = [], []
    for test_set, combos in (("setA", COMBOS_A), ("setB", COMBOS_B + [None])):
        for i, combo in enumerate(combos):
            q = {"test_set": test_set, "id": str(i), "instruction": f"Question {test_set} {i}",
                 "input": "some input" if i % 2 else ""}
            if combo is None:
                sys_out = f"{JUDGE_GARBLE} answer"
            else:
                # o1 compares our position-1 score with 5; o2 our position-2 score with 5
                sys_out = f"Answer <<{SCORE[combo[0]]},{SCORE[combo[1]]}>>"
            sys_rows.append({**q, "output": sys_out})
            base_rows.append({**q, "output": "Baseline <<5,5>>"})
    base_rows.sort(key=lambda r: (r["test_set"], -int(r["id"])))  # another order than the system
    return answers(tmp / "sys.jsonl", sys_rows), answers(tmp / "base.jsonl", base_rows)


def run(tmp: Path, srv, *args: str) -> int:
    return main([*args, "-o", str(tmp / "out"), "--base-url", srv.base_url,
                 "--cache", str(tmp / "cache.sqlite"), *FAST])


def test_prompt_is_verbatim() -> None:
    msgs = judge_messages("Q? Input: x", "ans one", "ans two")
    assert msgs[0] == {"role": "system", "content": "You are a helpful and precise assistant for checking the quality of the answer."}
    assert msgs[1]["content"] == (
        "[Question]\nQ? Input: x\n\n[The Start of Assistant 1's Answer]\nans one\n\n"
        "[The End of Assistant 1's Answer]\n\n[The Start of Assistant 2's Answer]\nans two\n\n"
        f"[The End of Assistant 2's Answer]\n\n[System]\n{CRITERIA}\n\n"
    )
    assert question("Do it.", "") == "Do it." and question("Do it.", "x") == "Do it. Input: x"
    assert judge_messages("{answer_1}", "{question}", "b")[1]["content"].startswith("[Question]\n{answer_1}\n")


@pytest.mark.parametrize("reply,pair", [("8 7", (8, 7)), ("8, 7\nbla", (8, 7)), (" 9.5  3 ", (9.5, 3))])
def test_parse_pair(reply: str, pair: tuple) -> None:
    assert parse_pair(reply) == pair


@pytest.mark.parametrize("reply", ["8", "8 7 6", "good bad", "", "11 3", "0 5"])
def test_parse_pair_rejects(reply: str) -> None:
    with pytest.raises(ValueError):
        parse_pair(reply)


def test_hand_computed_case_end_to_end(server, tmp_path: Path, capsys) -> None:
    sys_file, base_file = make_files(tmp_path)
    srv = server()
    assert run(tmp_path, srv, "--system", f"phased={sys_file}", "--baseline", f"one-off={base_file}") == 0
    out = tmp_path / "out"
    md = (out / "winrate.md").read_text()
    # setA: win 3 tie 2 lose 0 -> +30.00; setB: win 1 tie 1 lose 3 (+1 unparseable) -> -20.00; avg +5.00
    assert "| system | setA | setB | avg |" in md
    assert "| phased | +30.00 | -20.00 | +5.00 |" in md
    assert "3/2/0 (0)" in md and "1/1/3 (1)" in md
    assert "phased / setB / 5: order 1: first line is not two scores" in md
    data = json.loads((out / "winrate.json").read_text())
    assert data["systems"]["phased"]["avg"] == pytest.approx(5.0)
    assert data["systems"]["phased"]["test_sets"]["setB"]["unparseable"] == 1
    rows = list(csv.DictReader((out / "winrate.csv").open()))
    assert [(r["test_set"], r["winrate_points"]) for r in rows] == [("setA", "30.0000"), ("setB", "-20.0000"), ("avg", "5.0000")]
    assert (out / "winrate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # both orders for every pair
    assert len(srv.entries()) == 2 * 11
    j = {(r["test_set"], r["id"]): r for r in read_jsonl(out / "judgments.jsonl")}
    first = j[("setA", "4")]  # (win, lose): 7 vs 5 as Assistant 1, 3 vs 5 as Assistant 2
    assert first["system_first"]["system_score"] == 7 and first["baseline_first"]["system_score"] == 3
    assert first["outcome"] == "tie" and j[("setB", "1")]["outcome"] == "lose"
    assert "| phased | +30.00 | -20.00 | +5.00 |" in capsys.readouterr().out


def test_several_systems_one_baseline(server, tmp_path: Path) -> None:
    sys_file, base_file = make_files(tmp_path)
    rows = read_jsonl(sys_file)
    better = answers(tmp_path / "better.jsonl", [{**r, "output": "Great <<9,9>>"} for r in rows])
    srv = server()
    assert run(tmp_path, srv, "--systems", str(sys_file), str(better), "--baseline", str(base_file)) == 0
    md = (tmp_path / "out" / "winrate.md").read_text()
    assert "| sys | +30.00 | -20.00 | +5.00 |" in md
    assert "| better | +50.00 | +50.00 | +50.00 |" in md
    # cached: judging again sends nothing
    srv.reset_log()
    assert run(tmp_path, srv, "--systems", str(sys_file), str(better), "--baseline", str(base_file)) == 0
    assert srv.entries() == []


def test_missing_and_duplicate_ids_are_named(server, tmp_path: Path, capsys) -> None:
    sys_file, base_file = make_files(tmp_path)
    rows = read_jsonl(sys_file)
    srv = server()
    short = answers(tmp_path / "short.jsonl", rows[:-1])
    assert run(tmp_path, srv, "--system", str(short), "--baseline", str(base_file)) == 2
    err = capsys.readouterr().err
    assert "('setB', '5')" in err and "has no answer" in err and str(short) in err
    dup = answers(tmp_path / "dup.jsonl", rows + [rows[2]])
    assert run(tmp_path, srv, "--system", str(dup), "--baseline", str(base_file)) == 2
    err = capsys.readouterr().err
    assert f"{dup}:12: duplicate (test_set, id) = ('setA', '2'), first on line 3" in err
    extra = answers(tmp_path / "extra.jsonl", rows + [{**rows[0], "id": "99"}])
    assert run(tmp_path, srv, "--system", str(extra), "--baseline", str(base_file)) == 2
    assert "('setA', '99') is not in the baseline" in capsys.readouterr().err
    assert srv.entries() == []


def test_dry_run(server, tmp_path: Path, capsys) -> None:
    sys_file, base_file = make_files(tmp_path)
    srv = server()
    assert run(tmp_path, srv, "--system", str(sys_file), "--baseline", str(base_file), "--dry-run") == 0
    assert "requests:          22 (0 already cached, 22 to send" in capsys.readouterr().out
    assert srv.entries() == []


def test_bad_answer_files_and_outdir_are_refused_before_any_request(server, tmp_path: Path, capsys) -> None:
    sys_file, base_file = make_files(tmp_path)
    srv = server()
    lines = sys_file.read_bytes().splitlines(keepends=True)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b"".join(lines[:3]) + lines[3].replace(b"Answer", b"R\xe9ponse") + b"".join(lines[4:]))
    assert run(tmp_path, srv, "--system", str(latin1), "--baseline", str(base_file)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"phased-judge: error: {latin1}:4: not UTF-8 (byte 0xe9") and err.count("\n") == 1
    blob = tmp_path / "answers.jsonl.gz"
    blob.write_bytes(gzip.compress(sys_file.read_bytes()))
    assert run(tmp_path, srv, "--system", str(blob), "--baseline", str(base_file)) == 2
    assert capsys.readouterr().err == f"phased-judge: error: {blob}: gzip-compressed; decompress it first (gunzip)\n"
    assert run(tmp_path, srv, "--system", str(sys_file), "--baseline", str(base_file), "--max-record-bytes", "50") == 2
    assert f"{base_file}:1: record too long" in capsys.readouterr().err
    (tmp_path / "out").write_text("a file, not a folder")
    assert run(tmp_path, srv, "--system", str(sys_file), "--baseline", str(base_file)) == 2
    assert f"-o: {tmp_path / 'out'} exists and is not a folder" in capsys.readouterr().err
    (tmp_path / "out").unlink()
    (tmp_path / "out" / "winrate.md").mkdir(parents=True)
    assert run(tmp_path, srv, "--system", str(sys_file), "--baseline", str(base_file)) == 2
    assert f"-o: {tmp_path / 'out' / 'winrate.md'} is a folder" in capsys.readouterr().err
    assert srv.entries() == []


def test_bias_section_and_judge_model_in_every_output(server, tmp_path: Path, capsys) -> None:
    # Whatever is shown as Assistant 1 scores 8, Assistant 2 scores 2: pure position bias.
    rows = [{"test_set": t, "id": str(i), "instruction": f"Q {t} {i}", "input": ""} for t in ("setA", "setB")
            for i in range(4)]
    sys_file = answers(tmp_path / "sys.jsonl", [{**r, "output": "A long answer <<8,2>>"} for r in rows])
    base_file = answers(tmp_path / "base.jsonl", [{**r, "output": "Short <<8,2>>"} for r in rows])
    srv = server()
    assert run(tmp_path, srv, "--system", f"phased={sys_file}", "--baseline", f"base={base_file}",
               "--model", "judge-x") == 0
    out = tmp_path / "out"
    md = (out / "winrate.md").read_text()
    assert "Judge: `judge-x`" in md and "## Judge bias" in md
    assert "| phased | setA | 4 | 0.00 | 1.00 | n/a / n/a | +0.00 (+8..+8) |" in md
    assert "| phased | all | 8 | 0.00 | 1.00 |" in md
    assert "## Judge bias" in capsys.readouterr().out
    data = json.loads((out / "winrate.json").read_text())
    assert data["judge"]["model"] == "judge-x"
    b = data["systems"]["phased"]["bias"]
    assert b["all"]["position_consistency"] == 0.0 and b["setB"]["first_position_wins"] == 1.0
    assert [q["items"] for q in b["all"]["length_quartiles"]] == [2, 2, 2, 2]
    rows_csv = list(csv.DictReader((out / "winrate.csv").open()))
    assert {r["judge_model"] for r in rows_csv} == {"judge-x"}
    assert [r["position_consistency"] for r in rows_csv] == ["0.0000"] * 3
    assert [r["first_position_wins"] for r in rows_csv] == ["1.0000"] * 3
    j = read_jsonl(out / "judgments.jsonl")
    assert {r["judge_model"] for r in j} == {"judge-x"}
    assert {(r["system_chars"], r["baseline_chars"]) for r in j} == {(len("A long answer <<8,2>>"), len("Short <<8,2>>"))}
    # the judgments file compares with itself as two identical judges
    assert main(["--agreement", str(out / "judgments.jsonl"), str(out / "judgments.jsonl")]) == 0
    # every item a tie, so chance agreement is certain: kappa undefined
    assert "agreement: 1.000 (8/8)" in (text := capsys.readouterr().out) and "kappa (win/tie/lose): n/a" in text
