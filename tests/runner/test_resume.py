"""Resume is exact: killed runs, rerun with the same command, end bitwise where an unbroken run ends."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from tests.runner.runs import (
    assert_matrix_is_fresh_eval,
    final_params,
    metrics,
    step_lines,
    train,
    write_config,
)

pytestmark = pytest.mark.slow
PHASE_ENDS = (14, 24, 29)  # 105 / 51+26 replayed / 23+12 replayed examples at batch 8


def test_reference_run_layout(reference):
    assert step_lines(reference) == list(range(1, PHASE_ENDS[-1] + 1))
    ckpts = sorted(int(p.name) for p in (reference / "checkpoints").iterdir() if p.name.isdigit())
    assert set(PHASE_ENDS) <= set(ckpts), "phase-end checkpoints are kept for good"
    assert len(set(ckpts) - set(PHASE_ENDS)) <= 2, "rolling checkpoints keep only checkpoint.keep"
    phases = sorted(p.name for p in (reference / "phases").iterdir())
    assert phases == ["phase1-stage1", "phase2-stage2", "phase3-stage3"]
    assert (reference / "hf" / "model.safetensors").is_file()


def _assert_same_up_to_reduction_order(out, reference, lr: float = 1e-3) -> None:
    """Runs that differ only in float32 reduction order (other meshes, other processes).

    The test config uses float32 compute and Adam with eps=1e-3, so an update is proportional
    to its gradient and float noise stays noise. Per-step loss and gradient norm: rtol 1e-5
    (float32 noise is ~1e-7). Params: each step moves an entry by at most ~lr (Adam's update is
    normalised), so after T steps a noise-level difference is far below 1e-4 * lr * T; one
    lr-sized wrong step (a wrong batch, a lost update) is 10^4 times that.
    """
    mine, ref = metrics(out), metrics(reference)
    assert sorted(mine) == sorted(ref) == list(range(1, PHASE_ENDS[-1] + 1))
    for step in ref:
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(mine[step][key], ref[step][key], rtol=1e-5,
                                       err_msg=f"{key} at step {step}")
    a, b = final_params(out), final_params(reference)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-4 * lr * PHASE_ENDS[-1],
                                   err_msg=k)


def _assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bitwise


# A kill mid-phase: test_safety.py's random moments; test_preemption.py's notices.
@pytest.mark.parametrize("kill_after", [PHASE_ENDS[0]], ids=["phase-boundary"])
def test_sigkill_then_rerun_is_exact(tiny_experiment, reference, tmp_path, kill_after):
    """With held-out stages and replay (the tests' config): the rerun replays the same draws
    and ends bitwise equal, with the same forgetting matrix, each row computed once."""
    out = tmp_path / "run"
    cfg = write_config(tiny_experiment, out)
    killed = train(cfg, kill_after=kill_after, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / "hf").exists()
    assert max(step_lines(out)) == kill_after
    resumed = train(cfg)
    # The run goes on from its newest checkpoint (at or before the kill); the next phase start
    # line says where: mid-way, or from the phase's first step after a phase-end checkpoint.
    phase, step = map(int, re.search(r"resuming phase (\d) at step (\d+)/", resumed.stdout).groups())
    starts, sizes = (0, *PHASE_ENDS), np.diff((0, *PHASE_ENDS))
    if step == sizes[phase - 1]:
        phase, expect = phase + 1, rf"from its first step \(global step {starts[phase] + 1}\)"
    else:
        expect = (rf"resuming at step {step + 1} of {sizes[phase - 1]} "
                  rf"\(global step {starts[phase - 1] + step + 1}\)")
    replayed = r" \(\+\d+ replayed\)" if phase > 1 else ""  # phase 1 has nothing to replay
    assert re.search(rf"phase {phase}/3 \(\d\): \d+ examples{replayed}, \d+ steps, {expect}",
                     resumed.stdout), resumed.stdout
    assert "starting at step" not in resumed.stdout
    assert step_lines(out) == list(range(1, PHASE_ENDS[-1] + 1)), "no step twice, none skipped"
    _assert_same_params(final_params(out), final_params(reference))
    events = [json.loads(x) for x in (out / "logs" / "phase_log.jsonl").read_text().splitlines()]
    assert [e["phase"] for e in events if e["event"] == "eval"] == [1, 2, 3]
    assert (out / "forgetting.csv").read_text() == (reference / "forgetting.csv").read_text()


def test_truncated_latest_checkpoint_falls_back(tiny_experiment, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    cfg = write_config(tiny_experiment, out)
    latest = out / "checkpoints" / str(PHASE_ENDS[-1])
    victim = max((p for p in latest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    shutil.rmtree(out / "phases" / "phase3-stage3")
    resumed = train(cfg)
    assert "is corrupt" in resumed.stdout
    assert (out / "checkpoints" / f"{PHASE_ENDS[-1]}.corrupt").exists()
    events = [json.loads(x) for x in (out / "logs" / "phase_log.jsonl").read_text().splitlines()]
    resume = [e for e in events if e["event"] == "resume"][-1]
    assert resume["step"] < PHASE_ENDS[-1]
    _assert_same_params(final_params(out), final_params(reference))


def test_restore_onto_fewer_devices(tiny_experiment, reference, tmp_path):
    """Saved on 8 fake devices, killed, resumed on 4: training continues to the end."""
    out = tmp_path / "run"
    cfg = write_config(tiny_experiment, out)
    train(cfg, kill_after=20, check=False, devices=8)
    resumed = train(cfg, devices=4)
    assert "resuming phase 2" in resumed.stdout
    assert step_lines(out) == list(range(1, PHASE_ENDS[-1] + 1))
    _assert_same_up_to_reduction_order(out, reference)


def test_local_pod_matches_one_process(tiny_experiment, reference, pod_reference):
    """2 processes x 1 device == 1 process x 8 devices; each process reads only its half."""
    out = pod_reference
    cfg = write_config(tiny_experiment, out)  # the same file the fixture ran
    _assert_same_up_to_reduction_order(out, reference)
    # the pod's forgetting matrix (each process evaluates its half of every held-out batch)
    assert_matrix_is_fresh_eval(out, cfg)
    reads = [[json.loads(x) for x in (out / "logs" / f"reads-process{p}.jsonl").read_text()
              .splitlines()] for p in range(2)]
    ref = [json.loads(x) for x in (reference / "logs" / "reads-process0.jsonl").read_text()
           .splitlines()]
    assert len(reads[0]) == len(reads[1]) == len(ref) == PHASE_ENDS[-1]
    for r0, r1, full in zip(reads[0], reads[1], ref, strict=True):
        assert len(r0["rows"]) == len(r1["rows"]) == len(full["rows"]) // 2
        assert r0["rows"] + r1["rows"] == full["rows"], "halves of the same global batch"
