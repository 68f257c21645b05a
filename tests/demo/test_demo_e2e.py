"""The README's first command, shortened (`--quick`: same code path, fewer examples, epochs and
seeds), run twice: the second run must reuse the base model, not pretrain it again."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.xla import FAST_COMPILE

REPO = Path(__file__).resolve().parents[2]
ARMS = ("phased", "oneoff", "reverse", "phased-replay", "phased-one-schedule")
MULTI_PHASE = ("phased", "reverse", "phased-replay", "phased-one-schedule")
SEEDS = (0, 1)  # the --quick run's seeds
pytestmark = pytest.mark.slow


def _demo(out: Path) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = FAST_COMPILE  # the host's one CPU device, as `make demo` has
    proc = subprocess.run([sys.executable, "-m", "phased_jax.demo", "--quick", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> tuple[Path, str, dict[str, float]]:
    out = tmp_path_factory.mktemp("demo") / "out"
    stdout = _demo(out)
    base_files = {p.name: p.stat().st_mtime_ns for p in (out / "base").iterdir()}
    return out, stdout, base_files


def test_base_model_is_built_once_and_reused(demo_out):
    out, stdout, base_files = demo_out
    assert "base model: pretrained and saved to" in stdout
    key = json.loads((out / "base" / "base_key.json").read_text())["key"]
    assert (out / f"pretrain-{key}" / "logs" / "metrics.jsonl").is_file()
    transformers = pytest.importorskip("transformers")
    assert type(transformers.AutoModelForCausalLM.from_pretrained(out / "base")).__name__ == \
        "LlamaForCausalLM"
    # Train one arm again from the reused base: same machine, same bytes (determinism).
    first = (out / "seed1" / "answers_reverse.jsonl").read_bytes()
    shutil.rmtree(out / "seed1" / "reverse")
    (out / "seed1" / "answers_reverse.jsonl").unlink()
    again = _demo(out)
    assert f"base model: reusing {out / 'base'}" in again and "pretrained and saved" not in again
    assert {p.name: p.stat().st_mtime_ns for p in (out / "base").iterdir()} == base_files
    assert sorted(p.name for p in out.glob("pretrain-*")) == [f"pretrain-{key}"]
    assert (out / "seed1" / "reverse" / "hf" / "config.json").is_file()
    assert (out / "seed1" / "answers_reverse.jsonl").read_bytes() == first


def test_boundary_checkpoints_for_every_phase(demo_out):
    out = demo_out[0]
    phased = ["phase1-stage1", "phase2-stage2", "phase3-stage3"]
    want = {"phased": phased, "phased-replay": phased, "phased-one-schedule": phased,
            "reverse": ["phase1-stage3", "phase2-stage2", "phase3-stage1"],
            "oneoff": ["phase1-oneoff"]}
    for seed in SEEDS:
        for arm, phases in want.items():
            run = out / f"seed{seed}" / arm
            assert sorted(p.name for p in (run / "phases").iterdir()) == phases
            for p in phases:
                assert (run / "phases" / p / "model_config.json").is_file()
            log = [json.loads(x) for x in (run / "logs" / "phase_log.jsonl").read_text()
                   .splitlines()]
            ends = [e["step"] for e in log if e["event"] == "phase_end"]
            kept = {int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()}
            assert len(ends) == len(phases) and set(ends) <= kept, "phase ends are kept"


def _log(run: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (run / "logs" / name).read_text().splitlines()]


def test_follow_up_arms_do_what_they_say(demo_out):
    """phased-replay's later phases train on their own examples plus half as many replayed;
    phased-one-schedule starts phases 2 and 3 mid-schedule, where phased warms up from 0."""
    seed0 = demo_out[0] / "seed0"
    examples = {arm: [e["examples"] for e in _log(seed0 / arm, "phase_log.jsonl")
                      if e["event"] == "phase_start"] for arm in MULTI_PHASE}
    assert examples["phased-one-schedule"] == examples["phased"]
    n1, *later = examples["phased"]
    assert examples["phased-replay"] == [n1] + [n + round(0.5 * n) for n in later]
    first_lr = {arm: {r["phase"]: r["lr"] for r in reversed(_log(seed0 / arm, "metrics.jsonl"))}
                for arm in ("phased", "phased-one-schedule")}
    for phase in ("phase2-stage2", "phase3-stage3"):
        assert first_lr["phased"][phase] == 0.0 < first_lr["phased-one-schedule"][phase]


@pytest.mark.parametrize("arm", ARMS)
def test_hf_exports_load_in_transformers(demo_out, arm):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(demo_out[0] / "seed1" / arm / "hf")
    assert type(model).__name__ == "LlamaForCausalLM"
    tok = transformers.AutoTokenizer.from_pretrained(demo_out[0] / "seed1" / arm / "hf")
    assert tok.eos_token_id == model.config.eos_token_id


def test_answers_report_seeds_table_and_plots(demo_out):
    out, stdout, _ = demo_out
    test_ids = [json.loads(x)["id"] for x in (out / "data" / "test.jsonl").read_text().splitlines()]
    for seed in SEEDS:
        for arm in ARMS:
            answers = [json.loads(x) for x in
                       (out / f"seed{seed}" / f"answers_{arm}.jsonl").read_text().splitlines()]
            assert [a["id"] for a in answers] == test_ids
            assert all(set(a) >= {"test_set", "id", "instruction", "input", "output"}
                       for a in answers)
    for seed in SEEDS:  # every multi-phase model answers at its inner phase boundaries too
        for arm in MULTI_PHASE:
            for k in (1, 2):
                answers = (out / f"seed{seed}" / f"answers_{arm}_after_phase{k}.jsonl").read_text()
                assert [json.loads(x)["id"] for x in answers.splitlines()] == test_ids
    report = (out / "report.md").read_text()
    for heading in ("## Verdict", "## Seeds", "Every seed and band:", "WinRate vs oneoff",
                    "[95% CI]", "phase 1 [1, 1.5)", "phase 3 [3.5, 5]", "base (pretraining)",
                    "## After each phase", "forgetting.png", "two-level bootstrap over 2 seeds",
                    "| all items | seed 0 | seed 1 | mean ± sd |"):
        assert heading in report, heading
    for arm in ARMS:  # the seeds table: one row per arm, one column per seed
        assert f"\n| {arm} | " in report
        for seed in SEEDS:  # every seed and band: one row per seed and arm
            assert f"\n| {seed} | {arm} | " in report
    for arm in MULTI_PHASE:
        for k in (1, 2, 3):
            assert f"\n| {arm}, after phase {k} | " in report
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == list(SEEDS) and results["arms"] == list(ARMS)
    pairs = ["phased vs oneoff", "reverse vs oneoff", "phased-replay vs oneoff",
             "phased-one-schedule vs oneoff", "phased-replay vs phased",
             "phased-one-schedule vs phased"]
    assert list(results["verdicts"]) == pairs
    assert all(v["verdict"] in ("beats", "ties", "loses") for v in results["verdicts"].values())
    assert results["bootstrap"]["phased vs oneoff"]["all"]["seeds"] == len(SEEDS)
    assert list(results["accuracy_after_phase"]) == list(MULTI_PHASE)
    for arm in MULTI_PHASE:
        assert list(results["accuracy_after_phase"][arm]) == ["after phase 1", "after phase 2",
                                                              "after phase 3"]
    for png in ("loss.png", "accuracy.png", "winrate.png", "forgetting.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    assert "report:" in stdout and "phased-jax train --config configs/demo.py" in stdout
    assert stdout.rstrip().splitlines()[-1].startswith("verdict: phased-one-schedule ")
    for pair in pairs:
        a, b = pair.split(" vs ")
        assert f"\nverdict: {a} " in stdout and f" {b} at this scale" in stdout
    assert "mean ± sd over 2 seeds" in stdout
    for stage in ("build data, corpus and tokenizer", "pretrain base model", "train phased seed 0",
                  "train oneoff seed 1", "train reverse seed 1", "train phased-replay seed 1",
                  "train phased-one-schedule seed 1", "generate seed 0", "report"):
        assert stage in stdout
