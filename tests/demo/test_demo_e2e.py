"""The README's first command, shortened (`--quick`: same code path, fewer examples and epochs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the demo runs on the host's one CPU device, as `make demo` does
    proc = subprocess.run([sys.executable, "-m", "phased_jax.demo", "--quick", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc.stdout


def test_boundary_checkpoints_for_every_phase(demo_out):
    out, _ = demo_out
    phases = sorted(p.name for p in (out / "phased" / "phases").iterdir())
    assert phases == ["phase1-stage1", "phase2-stage2", "phase3-stage3"]
    for p in phases:
        assert (out / "phased" / "phases" / p / "model_config.json").is_file()
    log = [json.loads(x) for x in (out / "phased" / "logs" / "phase_log.jsonl").read_text()
           .splitlines()]
    ends = [e["step"] for e in log if e["event"] == "phase_end"]
    kept = {int(p.name) for p in (out / "phased" / "checkpoints").iterdir() if p.name.isdigit()}
    assert len(ends) == 3 and set(ends) <= kept, "each phase end has a kept Orbax checkpoint"
    assert [p.name for p in (out / "oneoff" / "phases").iterdir()] == ["phase1-oneoff"]


@pytest.mark.parametrize("run", ["phased", "oneoff"])
def test_hf_exports_load_in_transformers(demo_out, run):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(demo_out[0] / run / "hf")
    assert type(model).__name__ == "LlamaForCausalLM"
    tok = transformers.AutoTokenizer.from_pretrained(demo_out[0] / run / "hf")
    assert tok.eos_token_id == model.config.eos_token_id


def test_answers_report_and_plots(demo_out):
    out, stdout = demo_out
    test_ids = [json.loads(x)["id"] for x in (out / "data" / "test.jsonl").read_text().splitlines()]
    for run in ("phased", "oneoff"):
        answers = [json.loads(x) for x in (out / f"answers_{run}.jsonl").read_text().splitlines()]
        assert [a["id"] for a in answers] == test_ids
        assert all(set(a) >= {"test_set", "id", "instruction", "input", "output"} for a in answers)
    for k in (1, 2):  # the phased model at the inner phase boundaries answers too
        answers = (out / f"answers_phased_after_phase{k}.jsonl").read_text().splitlines()
        assert [json.loads(x)["id"] for x in answers] == test_ids
    report = (out / "report.md").read_text()
    for heading in ("WinRate (points)", "win / tie / lose", "phase 1 [1, 1.5)", "phase 3 [3.5, 5]",
                    "after phase 1", "after phase 3"):
        assert heading in report
    results = json.loads((out / "results.json").read_text())
    assert list(results["accuracy_after_phase"]) == ["after phase 1", "after phase 2",
                                                     "after phase 3"]
    for png in ("loss.png", "accuracy.png", "winrate.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    assert "report:" in stdout and "phased-jax train --config configs/demo.py" in stdout
    for stage in ("build data and tokenizer", "train phased", "train oneoff", "generate phased",
                  "generate phased after each phase"):
        assert stage in stdout
