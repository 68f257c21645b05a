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

REPO = Path(__file__).resolve().parents[2]
ARMS = ("phased", "oneoff", "reverse")
SEEDS = (0, 1)  # the --quick run's seeds
pytestmark = pytest.mark.slow


def _demo(out: Path) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the demo runs on the host's one CPU device, as `make demo` does
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
    want = {"phased": ["phase1-stage1", "phase2-stage2", "phase3-stage3"],
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
    for k in (1, 2):  # the first seed's phased model at the inner phase boundaries answers too
        answers = (out / "seed0" / f"answers_phased_after_phase{k}.jsonl").read_text()
        assert [json.loads(x)["id"] for x in answers.splitlines()] == test_ids
    report = (out / "report.md").read_text()
    for heading in ("## Verdict", "Every seed:", "WinRate vs oneoff", "[95% CI]",
                    "phase 1 [1, 1.5)", "phase 3 [3.5, 5]", "after phase 1", "after phase 3",
                    "base (pretraining)"):
        assert heading in report, heading
    for seed in SEEDS:  # the seeds table: one row per seed and arm
        for arm in ARMS:
            assert f"\n| {seed} | {arm} | " in report
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == list(SEEDS) and results["arms"] == list(ARMS)
    assert set(results["verdicts"]) == {"phased", "reverse"}
    assert results["verdicts"]["phased"]["verdict"] in ("beats", "ties", "loses")
    assert list(results["accuracy_after_phase"]) == ["after phase 1", "after phase 2",
                                                     "after phase 3"]
    for png in ("loss.png", "accuracy.png", "winrate.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    assert "report:" in stdout and "phased-jax train --config configs/demo.py" in stdout
    assert stdout.rstrip().splitlines()[-1].startswith("verdict: reverse")
    assert "verdict: phased" in stdout and "mean ± sd over 2 seeds" in stdout
    for stage in ("build data, corpus and tokenizer", "pretrain base model", "train phased seed 0",
                  "train oneoff seed 1", "train reverse seed 1", "generate seed 0"):
        assert stage in stdout
