"""The forgetting matrix of a run (the tests' config holds out 10% of each stage and replays
0.5): its entries, its files, and `phased-jax compare`."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil

import pytest

from phased_jax.cli import main as cli_main
from phased_jax.train import forgetting
from tests.runner.runs import assert_matrix_is_fresh_eval, phase_events, write_config

pytestmark = pytest.mark.slow


def test_entries_equal_a_fresh_evaluation_of_each_phases_params(tiny_experiment, reference):
    assert_matrix_is_fresh_eval(reference, write_config(tiny_experiment, reference))


def test_files_hold_the_matrix_its_forgetting_and_backward_transfer(reference):
    evals = {e["phase"]: e["stage_losses"] for e in phase_events(reference, "eval")}
    assert sorted(evals) == [1, 2, 3]
    rows = {r["row"]: r for r in csv.DictReader(io.StringIO(
        (reference / "forgetting.csv").read_text()))}
    final = evals[3]
    for j in ("1", "2", "3"):
        best_earlier = min(evals[1][j], evals[2][j])
        assert float(rows["forgetting"][f"stage {j}"]) == pytest.approx(
            final[j] - best_earlier, rel=1e-5)
    # stage j was trained in phase j (order 1,2,3); the last stage has no backward transfer
    bwt = [evals[j][str(j)] - final[str(j)] for j in (1, 2)]
    assert float(rows["backward transfer"]["stage 1"]) == pytest.approx(bwt[0], rel=1e-5)
    assert rows["backward transfer"]["stage 3"] == ""
    assert float(rows["backward transfer"]["mean"]) == pytest.approx(sum(bwt) / 2, rel=1e-5)
    md = (reference / "forgetting.md").read_text()
    assert "| after phase 2 (2, step 24) |" in md and "Mean backward transfer: " in md
    tags = {json.dumps(sorted(k for k in e if k.endswith("_loss")))
            for e in map(json.loads, (reference / "logs" / "metrics.jsonl").read_text()
                         .splitlines()) if e["phase"] == "eval"}
    assert tags == {json.dumps(["heldout_loss", "stage1_loss", "stage2_loss", "stage3_loss"])}


def test_matrix_arithmetic_on_a_known_case():
    events = [{"event": "eval", "phase": k, "name": str(k), "step": 10 * k, "at_phase_end": True,
               "trained_stages": [k], "stage_losses": dict(zip("12", losses, strict=True))}
              for k, losses in ((1, (1.0, 3.0)), (2, (1.5, 2.0)))]
    events.insert(1, {**events[0], "at_phase_end": False, "stage_losses": {"1": 0.1, "2": 0.1}})
    m = forgetting.from_events(events, {"stages": [{"stage": "1", "label": "a"},
                                                   {"stage": "2", "label": "b"}]})
    assert [r.phase for r in m.rows] == [1, 2]  # a mid-phase eval is not a row
    assert m.forgetting() == {"1": 0.5, "2": -1.0}
    bt = m.backward_transfer()
    assert bt["1"] == -0.5 and math.isnan(bt["2"])
    assert m.mean_backward_transfer() == -0.5


def _compare(capsys, *runs) -> tuple[int, str, str]:
    code = cli_main(["compare", *map(str, runs)])
    out, err = capsys.readouterr()
    return code, out, err


def test_compare_prints_final_losses_side_by_side_and_refuses_other_items(
        reference, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(reference, other, ignore=shutil.ignore_patterns("checkpoints", "hf"))
    code, out, err = _compare(capsys, reference, other)
    assert code == 0 and not err
    final = {j: f"{v:.4f}" for j, v in phase_events(reference, "eval")[-1]["stage_losses"].items()}
    row = f"| {reference} | 3 | {final['1']} | {final['2']} | {final['3']} |"
    assert row in out and f"| {other} | 3 | {final['1']}" in out
    assert out.count("| after phase 3 (3, step 29) |") == 2  # each run's matrix
    # another held-out split (another seed): refused, one line, exit 2
    report = json.loads((other / "data_report.json").read_text())
    report["heldout"]["stages"][1]["ids"][0] = "someone-else"
    (other / "data_report.json").write_text(json.dumps(report))
    code, out, err = _compare(capsys, reference, other)
    assert code == 2 and not out and err.count("\n") == 1
    assert (f"phased-jax compare: error: {reference} and {other} hold out different records in "
            "stage 2 (2 differ of") in err


@pytest.mark.parametrize(("setup", "says"), [
    ("missing", "no such directory"),
    ("no_report", "no data_report.json, so not the output_dir of a `phased-jax train` run"),
    ("no_heldout", "held out nothing (data.eval_fraction=0)"),
])
def test_compare_bad_run_dirs_are_one_line(tmp_path, capsys, setup, says):
    run = tmp_path / "run"
    if setup != "missing":
        run.mkdir()
    if setup == "no_heldout":
        (run / "data_report.json").write_text(json.dumps({"heldout": {"stages": []}}))
    code, out, err = _compare(capsys, run)
    assert code == 2 and err.count("\n") == 1 and says in err, err
