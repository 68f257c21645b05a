"""The offline judge (exact match, pairwise rule, WinRate) and the Markdown/PNG report."""

import json

import pytest

from phased_jax.demo import judge, report

# id: (score, reference, answer of A = phased, answer of B = one-off); the expected outcome
# from A's side is hand-computed from score_answer (10 if right, else 1 + round(8 * ratio)).
CASES = {
    "p1a": (1.0, "abc", "abc", "abd"),      # 10 vs 6: win
    "p1b": (1.2, "abc", "abc", "abc."),     # trailing punctuation is normalised: tie
    "p1c": (1.4, "xyz", "q", "q"),          # equally wrong: tie
    "p1d": (1.0, "hello", "hello", "help"),  # win
    "p2a": (2.0, "PLANT", "plant", "PLAN"),  # case is kept: 1 vs 8: lose
    "p2b": (3.0, "42", "42 ", "24"),        # 10 vs 5: win
    "p3a": (4.0, "dcba", "dcb", "abcd"),    # 8 vs 3: win
    "p3b": (4.5, "35", "", "3"),            # 1 vs 6: lose
    "p3c": (3.5, "1", "0", "2"),            # 1 vs 1: tie
    "p3d": (5.0, "AB", "ab", "AB!"),        # 1 vs 10: lose
}
# phase 1: W2 T2 L0 -> (2 + 1) / 4 - 0.5 = +25.00; phase 2: W1 L1 -> 0.00;
# phase 3: W1 T1 L2 -> (1 + 0.5) / 4 - 0.5 = -12.50; all: W4 T3 L3 -> 5.5 / 10 - 0.5 = +5.00
EXPECTED = {"phase1": (2, 2, 0, 25.0), "phase2": (1, 0, 1, 0.0),
            "phase3": (1, 1, 2, -12.5), "all": (4, 3, 3, 5.0)}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path):
    refs, a, b = [], [], []
    for key, (score, ref, out_a, out_b) in CASES.items():
        base = {"test_set": "demo", "id": key, "instruction": "Do it.", "input": "x"}
        refs.append({**base, "output": ref, "score": score, "task": key[:2]})
        a.append({**base, "output": out_a})
        b.append({**base, "output": out_b})
    return (write_jsonl(tmp_path / "test.jsonl", refs), write_jsonl(tmp_path / "a.jsonl", a),
            write_jsonl(tmp_path / "b.jsonl", b))


def test_score_answer():
    assert judge.score_answer(" NADUK. ", "NADUK") == 10
    assert judge.score_answer("naduk", "NADUK") == 1  # case is part of the answer
    assert judge.score_answer("abd", "abc") == 6  # ratio 2/3
    assert judge.score_answer("", "abc") == 1


@pytest.mark.parametrize("first,second,want", [
    ("win", "win", "win"), ("win", "tie", "win"), ("tie", "win", "win"),
    ("tie", "tie", "tie"), ("win", "lose", "tie"), ("lose", "win", "tie"),
    ("lose", "lose", "lose"), ("lose", "tie", "lose"), ("tie", "lose", "lose"),
])
def test_paper_rule_over_two_orders(first, second, want):
    """The rule the judge applies (phased_tools.winrate's), on every pair of verdicts."""
    assert judge.combine(first, second) == want


def test_pairwise_hand_computed(files):
    test, a, b = files
    result = judge.pairwise(a, b, test)
    for s, (w, t, lose, wr) in EXPECTED.items():
        got = result["by_set"][s]
        assert (got["win"], got["tie"], got["lose"]) == (w, t, lose), s
        assert got["winrate"] == pytest.approx(wr), s
    p1a = next(i for i in result["items"] if i["id"] == "p1a")
    assert p1a["a_first"] == (10, 6) and p1a["b_first"] == (6, 10)
    # from B's side everything mirrors
    mirror = judge.pairwise(b, a, test)["by_set"]["all"]
    assert (mirror["win"], mirror["lose"], mirror["winrate"]) == (3, 4, pytest.approx(-5.0))


def test_accuracy_by_band(files):
    test, a, b = files
    acc_a, acc_b = judge.accuracy(a, test), judge.accuracy(b, test)
    assert [acc_a["by_band"][s]["correct"] for s in judge.BANDS] == [3, 1, 0]
    assert [acc_a["by_band"][s]["n"] for s in judge.BANDS] == [4, 2, 4]
    assert [acc_b["by_band"][s]["correct"] for s in judge.BANDS] == [1, 0, 1]
    assert acc_a["all"]["accuracy"] == pytest.approx(0.4)
    assert acc_a["by_task"]["p1"] == {"n": 4, "correct": 3, "accuracy": 0.75}


def test_unmatched_ids_are_clear_errors(files, tmp_path):
    test, a, _ = files
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    short = write_jsonl(tmp_path / "short.jsonl", rows[1:])
    with pytest.raises(judge.JudgeError, match="no answer for 1 id.*p1a"):
        judge.accuracy(short, test)
    dup = write_jsonl(tmp_path / "dup.jsonl", rows + rows[:1])
    with pytest.raises(judge.JudgeError, match="dup.jsonl:11: id 'p1a' appears twice"):
        judge.accuracy(dup, test)
    extra = write_jsonl(tmp_path / "extra.jsonl", rows + [{**rows[0], "id": "zz"}])
    with pytest.raises(judge.JudgeError, match="not in .*zz"):
        judge.pairwise(extra, a, test)


def write_metrics(path, boundaries, steps=30):
    lines = [json.dumps({"step": s, "loss": 3.0 / s + 0.5 * (s > boundaries[0] if boundaries else 0),
                         "phase": 1 + sum(s > x for x in boundaries)}) for s in range(1, steps + 1)]
    lines.insert(3, json.dumps({"step": 3, "eval_loss": 2.0}))  # no 'loss': skipped
    lines.insert(5, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_report_writes_markdown_and_pngs(files, tmp_path):
    """Two seeds with the answer files swapped: every mean, sd and pooled count is hand-checked
    (A is right on 3/4, 1/2, 0/4 of the bands and 4/10 overall; B on 1/4, 0/2, 1/4, 2/10).
    A follow-up variant of phased answers A on both seeds."""
    test, a, b = files
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"id": f"t{i}", "instruction": "i", "input": "", "output": "o", "score": s}
        for i, s in enumerate([1.0, 1.2, 1.0, 2.0, 2.5, 4.0])])
    m_phased = write_metrics(tmp_path / "m_phased.jsonl", [10, 20])
    m_oneoff = write_metrics(tmp_path / "m_oneoff.jsonl", [])
    runs = {seed: {"phased": {"metrics_jsonl": m_phased, "phase_boundaries": [10, 20],
                              "answers": x},
                   "oneoff": {"metrics_jsonl": m_oneoff, "phase_boundaries": [], "answers": y},
                   "phased-replay": {"metrics_jsonl": m_phased, "phase_boundaries": [10, 20],
                                     "answers": a}}
            for seed, (x, y) in ((0, (a, b)), (1, (b, a)))}
    after = {seed: {"after phase 1": b, "after phase 2": a} for seed in (0, 1)}
    out = tmp_path / "report"
    path, res = report.write_report(
        out, runs=runs, test_path=test, train_path=train,
        timings={"data": 0.5, "train phased": 60.0, "train oneoff": 59.5},
        phase_answers={"phased": after, "phased-replay": after},
        extra={"model": "tiny (d=128, 4 layers)", "total_seconds": 121.234,
               "big": {"items": [1, 2]}})
    assert path == out / "report.md"
    for png in ("loss.png", "accuracy.png", "winrate.png", "forgetting.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    md = path.read_text()
    # (75 + 25) / 2 = 50, sd = sqrt(2 * 25^2 / 1) = 35.36; all: 30 +- 14.14
    assert ("| exact match, phased | 50.0 ± 35.4% | 25.0 ± 35.4% | 12.5 ± 17.7% | 30.0 ± 14.1% |"
            in md)
    assert "| WinRate vs oneoff, phased (points) | +0.00 ± 35.36 | +0.00 ± 0.00 |" in md
    assert "| 1 | phased | 25.0% | 0.0% | 25.0% | 20.0% |" in md  # every seed and band
    assert "| all items | seed 0 | seed 1 | mean ± sd |" in md  # the seeds table
    assert "| phased | 40.0% | 20.0% | 30.0 ± 14.1% |" in md
    assert "| phased - oneoff (points) | +20.0 | -20.0 | +0.0 ± 28.3 |" in md
    assert "| phased-replay - phased (points) | +0.0 | +20.0 | +10.0 ± 14.1 |" in md
    # pooled over seeds: seed 0 is EXPECTED, seed 1 its mirror
    assert "| win / tie / lose | 2 / 4 / 2 | 2 / 0 / 2 | 3 / 2 / 3 | 7 / 6 / 7 |" in md
    assert "| phase 1 [1, 1.5) | 3 | 50.0% | 1.07 | 4 | 1.15 |" in md  # the phase table
    assert ("| phased-replay, after phase 2 | 75.0 ± 0.0% | 50.0 ± 0.0% | 0.0 ± 0.0% | "
            "40.0 ± 0.0% |" in md)
    assert "| **total** | **120.0** |" in md and "| train phased | 60.0 |" in md
    assert "| phased (seed 0) | 30 | 3.000 | 0.600 | 10, 20 |" in md
    assert "- **total_seconds**: 121.2" in md and str(a) in md
    assert "**big**" not in md  # structured extras go to results.json only
    # the swapped seeds cancel exactly: the pooled difference is 0, so the verdict is a tie
    boot = res["bootstrap"]["phased vs oneoff"]["all"]
    assert boot["n"] == 20 and boot["seeds"] == 2 and boot["diff"] == 0
    assert boot["lo"] < 0 < boot["hi"]
    assert list(res["verdicts"]) == ["phased vs oneoff", "phased-replay vs oneoff",
                                     "phased-replay vs phased"]  # the follow-up comparison
    assert res["verdicts"]["phased vs oneoff"]["verdict"] == "ties"
    assert "phased ties with oneoff at this scale: exact match +0.0 points" in md
    assert "two-level bootstrap over 2 seeds x 10 items" in md
    assert "phased-replay - phased, points [95% CI]" in md
    assert "verdict: phased ties with oneoff" in res["summary_text"]
    assert "verdict: phased-replay ties with phased" in res["summary_text"]
    assert "- **phased-replay** (`data.order=1,2,3 data.replay=0.5`)" in md
    # one-off's means are 50 / 25 / 12.5%: only phase 3 is below the designed 20% floor
    assert res["headroom"]["bands_outside"] == ["phase3"]
    assert "outside the designed 20-90% headroom in phase 3 [3.5, 5];" in md
    results = json.loads((out / "results.json").read_text())
    assert results["winrate_pooled"]["phased"]["all"]["win"] == 7
    assert results["accuracy_after_phase"]["phased"]["after phase 1"]["all"] == [0.2, 0.0]
    assert results["accuracy"]["phased"]["1"]["all"]["correct"] == 2
    assert results["extra"]["big"] == {"items": [1, 2]}
    assert not list(out.glob(".*")), "temporary files left behind"


def test_report_needs_the_baseline(files, tmp_path):
    test, a, _ = files
    runs = {0: {"phased": {"metrics_jsonl": "m", "answers": a}}}
    with pytest.raises(report.ReportError, match="'oneoff' arm"):
        report.write_report(tmp_path, runs=runs, test_path=test, timings={})


def test_metrics_reader_names_the_bad_line(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": \n')
    with pytest.raises(report.ReportError, match=r"m\.jsonl:2: not valid JSON"):
        report.read_metrics(bad)
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lr": 1e-3}\n{"step": 3, "loss": NaN}\n')
    assert [r["step"] for r in report.read_metrics(ok)] == [1]


def test_metrics_reader_skips_a_torn_last_line(tmp_path, capsys):
    torn = tmp_path / "m.jsonl"
    torn.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in report.read_metrics(torn)] == [1, 2]
    assert "torn last line" in capsys.readouterr().out
