"""benchmarks/forgetting_cost.py without compiling or training: the projection's arithmetic, the
phase-log reading (and its message for a log without the forgetting matrix) and the table."""

import importlib.util
import json
import sys

import pytest

from tests.conftest import REPO


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("forgetting_cost",
                                                  REPO / "benchmarks" / "forgetting_cost.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()
SIZES = {"1": 30_300, "2": 14_700, "3": 6_889}


def test_projection_counts_each_stage_held_out_at_every_phase_end():
    rows, held = bench.project(SIZES, ["1", "2", "3"], 0.02, 128, 2,
                               {"train": 3.0, "eval": 1.0})
    assert held == {"1": 606, "2": 294, "3": 138}
    assert [r.eval_steps for r in rows] == [5 + 3 + 2] * 3  # one padded pass per stage
    assert [r.train_steps for r in rows] == [2 * 232, 2 * 113, 2 * 53]  # ceil(rest / 128)
    assert rows[2].ratio == pytest.approx(10 / (3 * 106))


def test_stage_sizes_without_the_scored_file_are_table_1():
    sizes, source = bench.stage_sizes(str(REPO / "configs" / "llama2_7b_phased.py"))
    assert (sizes["1"], sizes["2"]) == (30_300, 14_700) and "Table 1" in source
    assert sizes["3"] == (6_889 if bench.STAGE3_RELEASE.is_file() else 6_800)


def _log(tmp_path, evals):
    lines = [{"time": 100.0, "event": "phase_start", "phase": 1},
             {"time": 110.0, "event": "step", "phase": 1},
             {"time": 130.0, "event": "step", "phase": 1},
             {"time": 131.0, **evals},
             {"time": 132.0, "event": "phase_end", "phase": 1}]
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "phase_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return tmp_path


def test_measured_costs_read_the_phase_log(tmp_path):
    run = _log(tmp_path, {"event": "eval", "phase": 1, "at_phase_end": True,
                          "stage_losses": {"1": 1.0}, "seconds": 0.5})
    [m] = bench.measured_costs(run)
    assert (m.train_s, m.eval_s, m.ratio) == (30.0, 0.5, pytest.approx(0.5 / 30))


def test_a_log_without_stage_losses_is_refused_clearly(tmp_path):
    run = _log(tmp_path, {"event": "eval", "phase": 1, "eval_loss": 1.0})  # the old line
    with pytest.raises(SystemExit, match="phase 1 has no phase-end eval line with 'stage_losses'"):
        bench.measured_costs(run)


def test_table_puts_the_measured_and_projected_ratios_side_by_side():
    rows, held = bench.project(SIZES, ["1", "2", "3"], 0.02, 128, 2, {"train": 3e15, "eval": 1e15})
    measured = [bench.Measured(k, 10.0, 0.1 * k) for k in (1, 2, 3)]
    text = bench.table(measured, {"1": 88, "2": 43, "3": 20}, rows, held, 459e12, 0.4)
    last = text.splitlines()[-1]
    assert last.startswith("3 ") and "3.00%" in last and f"{rows[2].ratio:.2%}" in last
    assert "88/43/20" in last and "606/294/138" in last
