"""Judge-bias statistics and two-judge agreement on constructed judgments with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from phased_tools.agreement import cohen_kappa, compare, load_judgments
from phased_tools.bias import ALL, JudgedPair, bias, bias_by_system, judged_pair
from phased_tools.judge import main
from phased_tools.report import to_markdown
from phased_tools.winrate import Tally


def row(i: int, first: tuple[float, float], second: tuple[float, float], sys_chars: int, base_chars: int,
        test_set: str = "s", system: str = "sys") -> dict:
    """A judgments.jsonl row: `first` = (system, baseline) scores with the system shown first,
    `second` the same with the baseline shown first."""
    return {"system": system, "baseline": "base", "test_set": test_set, "id": str(i), "judge_model": "m",
            "system_chars": sys_chars, "baseline_chars": base_chars,
            "system_first": {"system_score": first[0], "baseline_score": first[1]},
            "baseline_first": {"system_score": second[0], "baseline_score": second[1]}}


def test_judge_preferring_the_first_answer() -> None:
    # Assistant 1 always gets 8, Assistant 2 always 2: system wins as 1st, loses as 2nd.
    rows = [row(i, (8, 2), (2, 8), 100 + i, 100) for i in range(12)]
    b = bias_by_system(rows, ["s"])["sys"][ALL]
    assert b.items == 12
    assert b.position_consistency == 0.0
    assert b.first_position_wins == 1.0
    assert (b.winner_chars, b.loser_chars) == (None, None)  # every item a tie after both orders
    assert [q.winrate for q in b.length_quartiles] == [0.0] * 4


def test_judge_preferring_the_longer_answer() -> None:
    rows = []
    for i in range(20):
        sys_len, base_len = 50 + 10 * i, 150  # the system is shorter for i < 10, longer for i > 10
        s = 9 if sys_len > base_len else 3 if sys_len < base_len else 5
        rows.append(row(i, (s, 5), (s, 5), sys_len, base_len))
    b = bias_by_system(rows, ["s"])["sys"]["s"]
    assert b.position_consistency == 1.0
    assert b.first_position_wins == pytest.approx(19 / 40)  # the system first and longer: 9 of 20; base first and longer: 10
    assert b.winner_chars > b.loser_chars
    # 19 decided items: winners are the longer answer of each
    decided = [(50 + 10 * i, 150) for i in range(20) if i != 10]
    assert b.winner_chars == pytest.approx(sum(max(d) for d in decided) / 19)
    assert b.loser_chars == pytest.approx(sum(min(d) for d in decided) / 19)
    qs = b.length_quartiles
    assert [q.items for q in qs] == [5, 5, 5, 5]
    assert [q.winrate for q in qs] == [-50.0, -50.0, 40.0, 50.0]  # Q3 holds the one tie (i = 10)
    assert (qs[0].low, qs[0].high, qs[3].low, qs[3].high) == (-100, -60, 50, 90)


def test_an_unbiased_judge_and_empty_groups() -> None:
    rows = [row(0, (7, 5), (7, 5), 10, 10), row(1, (5, 7), (5, 7), 10, 10)]
    b = bias(list(filter(None, map(judged_pair, rows))))
    assert (b.position_consistency, b.first_position_wins) == (1.0, 0.5)
    assert [q.items for q in b.length_quartiles] == [0, 1, 0, 1]
    empty = bias([])
    assert empty.position_consistency is None and empty.first_position_wins is None
    assert all(q.winrate is None and q.low is None for q in empty.length_quartiles)


def test_unparseable_orders_are_left_out_and_test_sets_split() -> None:
    rows = [row(0, (8, 2), (2, 8), 1, 1, "a"), row(1, (7, 5), (7, 5), 1, 1, "b")]
    rows.append({**row(2, (1, 1), (1, 1), 1, 1, "b"), "baseline_first": {"replies": ["?"], "error": "x"}})
    table = bias_by_system(rows, ["a", "b"])["sys"]
    assert (table["a"].items, table["b"].items, table[ALL].items) == (1, 1, 2)
    assert table["a"].position_consistency == 0.0 and table["b"].position_consistency == 1.0
    assert table[ALL].position_consistency == 0.5
    assert JudgedPair("x", "win", "lose", 0, 0).outcome == "tie"


def test_winner_and_loser_lengths_keep_a_half_character_in_winrate_md() -> None:
    # The system wins both items, 101 and 102 characters against 100: winners 101.5, losers 100.
    # Whole characters printed "102 / 100", a 1.5-character gap shown as 2.
    rows = [row(0, (8, 2), (8, 2), 101, 100), row(1, (8, 2), (8, 2), 102, 100)]
    md = to_markdown({"sys": {"s": Tally(win=2)}}, "base", ["s"], [], bias_by_system(rows, ["s"]))
    assert "| sys | s | 2 | 1.00 | 0.50 | 101.5 / 100.0 |" in md


def test_kappa_by_hand() -> None:
    assert cohen_kappa([("win", "win"), ("tie", "tie"), ("lose", "lose"), ("win", "win")]) == 1.0
    # 2x2 table [[20, 5], [10, 15]]: p_o = 35/50 = 0.7; p_e = (25*30 + 25*20)/2500 = 0.5; kappa = 0.4
    pairs = [("win", "win")] * 20 + [("win", "lose")] * 5 + [("lose", "win")] * 10 + [("lose", "lose")] * 15
    assert cohen_kappa(pairs) == pytest.approx(0.4)
    # 3x3 table rows A (win, tie, lose), columns B: [[10, 2, 1], [3, 5, 2], [1, 1, 5]], n = 30
    # p_o = 20/30; A margins 13, 10, 7; B margins 14, 8, 8; p_e = (182 + 80 + 56)/900 = 318/900
    table = {("win", "win"): 10, ("win", "tie"): 2, ("win", "lose"): 1, ("tie", "win"): 3, ("tie", "tie"): 5,
             ("tie", "lose"): 2, ("lose", "win"): 1, ("lose", "tie"): 1, ("lose", "lose"): 5}
    pairs = [k for k, n in table.items() for _ in range(n)]
    assert cohen_kappa(pairs) == pytest.approx((20 / 30 - 318 / 900) / (1 - 318 / 900))
    assert cohen_kappa([("tie", "tie")] * 3) is None and cohen_kappa([]) is None


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def verdict_rows(verdicts: list[str | None], model: str) -> list[dict]:
    return [{"system": "sys", "baseline": "base", "test_set": "s", "id": str(i), "outcome": v, "judge_model": model}
            for i, v in enumerate(verdicts)]


def test_agreement_command(tmp_path: Path, capsys) -> None:
    a = write_rows(tmp_path / "a.jsonl", verdict_rows(["win", "win", "lose", "tie", None, "win"], "gpt-4-0613"))
    b_rows = verdict_rows(["win", "lose", "lose", "tie", "win"], "local-judge")
    b = write_rows(tmp_path / "b.jsonl", b_rows + [{**b_rows[0], "id": "extra"}])
    assert main(["--agreement", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    # compared: ids 0-3 (4 is unjudged in A, 5 only in A, extra only in B); 3 of 4 agree
    assert "items compared: 4" in out and "agreement: 0.750 (3/4)" in out
    result = compare(load_judgments(a), load_judgments(b))
    assert f"Cohen's kappa (win/tie/lose): {result.kappa:.3f}" in out
    assert "only in A (1): s/5 (sys vs base)" in out and "only in B (1): s/extra (sys vs base)" in out
    assert "unjudged in A or B (1): s/4 (sys vs base)" in out
    assert "judge gpt-4-0613" in out and "judge local-judge" in out
    assert main(["--agreement", str(a), str(a)]) == 0
    assert "Cohen's kappa (win/tie/lose): 1.000" in capsys.readouterr().out


@pytest.mark.parametrize("content,message", [
    ('{"system": "sys"}\n', "bad.jsonl:1: no field 'test_set'"),
    ('{"system": "s", "baseline": "b", "test_set": "t", "id": 1, "outcome": "great"}\n',
     "bad.jsonl:1: outcome 'great' is not one of"),
    ('{"system": "s", "baseline": "b", "test_set": "t", "id": 1, "outcome": "win"}\n' * 2,
     "bad.jsonl:2: item t/1/s/b already on line 1"),
    ("not json\n", "bad.jsonl:1:"),
])
def test_agreement_bad_files_are_one_line_errors(tmp_path: Path, capsys, content: str, message: str) -> None:
    good = write_rows(tmp_path / "good.jsonl", verdict_rows(["win"], "m"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content, encoding="utf-8")
    assert main(["--agreement", str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("phased-judge: error: ")
    assert main(["--agreement", str(good), str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_agreement_with_nothing_in_common(tmp_path: Path, capsys) -> None:
    a = write_rows(tmp_path / "a.jsonl", verdict_rows(["win"], "m"))
    b = write_rows(tmp_path / "b.jsonl", [{**verdict_rows(["win"], "m")[0], "id": "other"}])
    assert main(["--agreement", str(a), str(b)]) == 2
    assert "no item judged in both" in capsys.readouterr().err
