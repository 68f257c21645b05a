"""A run never loses its state: changed flags, kills at any moment, torn logs, a full disk."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.runner.runs import REPO, final_params, phase_params, step_lines, train, write_config
from tests.xla import xla_flags

pytestmark = pytest.mark.slow
PHASE_ENDS = (14, 24, 29)  # tests/runner/runs.py's config: held-out stages, replay 0.5
PHASES = ("phase1-stage1", "phase2-stage2", "phase3-stage3")


def _snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _assert_complete_and_equal(out: Path, reference: Path) -> None:
    """Every step once, every phases/ directory present and bitwise the reference's."""
    assert step_lines(out) == list(range(1, PHASE_ENDS[-1] + 1)), "no step twice, none skipped"
    assert sorted(p.name for p in (out / "phases").iterdir()) == list(PHASES), "no temp dirs"
    for name in PHASES:
        mine, ref = phase_params(out / "phases" / name), phase_params(reference / "phases" / name)
        for k in ref:
            np.testing.assert_array_equal(mine[k], ref[k], err_msg=f"{name} {k}")
    events = [json.loads(x) for x in (out / "logs" / "phase_log.jsonl").read_text().splitlines()]
    ends = [e["phase"] for e in events if e["event"] == "phase_end"]
    assert ends == [1, 2, 3], "each phase's phase_end line exactly once"
    assert not [p for p in (out / "checkpoints").iterdir() if "tmp" in p.name]


@pytest.mark.parametrize("flag", ["--config.model.num_layers=3", "--config.train.clip_norm=0"])
def test_changed_flag_is_a_clear_error_and_touches_nothing(tiny_experiment, reference, tmp_path,
                                                           flag):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = _snapshot(out / "checkpoints") | _snapshot(out / "phases") | _snapshot(out / "hf")
    proc = train(write_config(tiny_experiment, out), flag, check=False)
    assert proc.returncode == 1
    field = flag.split("=")[0].removeprefix("--config.")
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and field in errors[0] and "nothing was moved" in errors[0]
    assert "Traceback" not in proc.stderr
    after = _snapshot(out / "checkpoints") | _snapshot(out / "phases") | _snapshot(out / "hf")
    assert after == before, "checkpoints, phases/ and hf/ untouched byte for byte"


def test_kill_right_after_a_phase_end_commit_completes_that_phase(tiny_experiment, reference,
                                                                   tmp_path):
    """Sync saves make the kill land after the phase-1 end checkpoint commits, before its
    phases/ params, eval and phase_end line: the rerun must write them before phase 2.
    (Eval and sync saves change no number, so every phases/ dir is the reference's.)"""
    out = tmp_path / "run"
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text("".join(Path(tiny_experiment["data"]).read_text().splitlines(True)[:16]))
    cfg = write_config(tiny_experiment, out, extra="c.checkpoint.async_save = False\n"
                                                   f"c.data.eval_path = '{held_out}'")
    killed = train(cfg, kill_after=PHASE_ENDS[0], check=False)
    assert killed.returncode == -9
    assert (out / "checkpoints" / str(PHASE_ENDS[0])).is_dir()
    assert not (out / "phases").exists()
    resumed = train(cfg)
    assert f"resuming phase 1 at step {PHASE_ENDS[0]}/{PHASE_ENDS[0]}" in resumed.stdout
    assert resumed.stdout.index("eval loss at phase 1 end") < resumed.stdout.index("phase 2/3")
    events = [json.loads(x) for x in (out / "logs" / "phase_log.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["phase"] for e in evals] == [1, 2, 3]
    assert all("eval_loss" in e and len(e["stage_losses"]) == 3 for e in evals)
    _assert_complete_and_equal(out, reference)


def test_torn_log_lines_do_not_stop_a_resume(tiny_experiment, reference, tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tiny_experiment, out)
    assert train(cfg, kill_after=20, check=False).returncode == -9
    for name in ("phase_log.jsonl", "metrics.jsonl"):
        with open(out / "logs" / name, "a") as f:
            f.write('{"event": "step", "phase": 2, "st')  # a kill mid-write
    resumed = train(cfg)
    assert "torn line" in resumed.stdout
    _assert_complete_and_equal(out, reference)
    np.testing.assert_array_equal(final_params(out)["['embed']"],
                                  final_params(reference)["['embed']"])


def _watch(proc: subprocess.Popen, out: Path, until, deadline_s: float = 300) -> bool:
    """Poll until `until(out)` holds (then SIGKILL `proc`); False if `proc` ended first."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        if until(out):
            proc.kill()
            proc.wait()
            return True
        time.sleep(0.002)
    raise AssertionError("the run neither reached the kill moment nor ended")


def _saving(out: Path) -> bool:
    ckpts = out / "checkpoints"
    return ckpts.is_dir() and any("tmp" in p.name for p in ckpts.iterdir())


def _logged_step(out: Path) -> int:
    try:
        lines = (out / "logs" / "phase_log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(x).get("step", 0) for x in lines[-3:] if x.endswith("}")]
    return max(steps, default=0)


def test_sigkill_at_three_moments_then_rerun_is_exact(tiny_experiment, reference, tmp_path):
    """Killed from outside three times: during an async save, right after a phase-end commit,
    and at a random moment after a random step (seeded); each rerun resumes; the end is bitwise
    the reference. (SIGTERM at exact moments: test_preemption.py.)"""
    out = tmp_path / "run"
    cfg = write_config(tiny_experiment, out)
    rng = random.Random(10)
    later = sorted(rng.sample(range(PHASE_ENDS[0] + 2, PHASE_ENDS[-1]), 1))
    moments = [("during an async save", _saving),
               ("after the phase-1 end commit",
                lambda o: (o / "checkpoints" / str(PHASE_ENDS[0]) / "commit_success.txt").exists())]
    moments += [(f"at step {s} + {d:.2f}s", lambda o, s=s, d=d: _logged_step(o) >= s
                 and (time.sleep(d) or True)) for s, d in zip(later, [rng.random() * 0.3
                                                                     for _ in later], strict=True)]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(8))
    command = [sys.executable, "-m", "phased_jax.cli", "train", "--config", str(cfg)]
    for what, until in moments:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        assert _watch(proc, out, until), f"the run ended before the kill {what}"
        assert proc.returncode == -9
    train(cfg)
    _assert_complete_and_equal(out, reference)
    mine, ref = final_params(out), final_params(reference)
    for k in ref:
        np.testing.assert_array_equal(mine[k], ref[k], err_msg=k)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def test_full_disk_is_one_clear_line_then_a_clean_resume(tiny_experiment, reference, tmp_path):
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "6m"):
        pytest.skip("needs `mount -t tmpfs` (root in a container that allows it) for a full disk")
    try:
        out = mnt / "run"
        cfg = write_config(tiny_experiment, out)
        full = train(cfg, check=False)
        assert full.returncode == 1, full.stderr[-3000:]
        errors = [line for line in full.stderr.splitlines() if line.strip()]
        assert "no space left" in errors[-1].lower() and str(mnt) in errors[-1]
        assert "Traceback" not in full.stderr
        assert not [p for p in (out / "phases").glob("*") if "tmp" in p.name] \
            if (out / "phases").exists() else True
        subprocess.run(["mount", "-o", "remount,size=256m", str(mnt)], check=True)
        resumed = train(cfg)
        assert "resuming phase" in resumed.stdout
        _assert_complete_and_equal(out, reference)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_metrics_on_a_full_disk_raise_rather_than_hang(tmp_path):
    """TensorBoard's scalars are written in the caller's thread: tensorboardX's own writer
    thread died on a full disk and its bounded queue then blocked the training loop forever
    (seen once in CI, in the test above)."""
    import errno
    import threading

    from phased_jax.train.metrics import MetricsWriter

    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "1m"):
        pytest.skip("needs `mount -t tmpfs` (root in a container that allows it) for a full disk")
    try:
        writer = MetricsWriter(mnt / "logs", flops_per_step=1.0, tokens_per_step=1,
                               peak_flops_total=1.0, total_steps=1000, log_every=1,
                               console=False)
        metrics = {f"metric_{i}": np.float32(i) for i in range(15)}
        writer.write(1, metrics)
        writer.write(2, metrics)
        with open(mnt / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:  # the rest of the disk
                f.write(b"\0" * 4096)
        raised: list[BaseException] = []

        def keep_logging() -> None:
            try:
                for step in range(3, 1000):
                    writer.write(step, metrics)
            except OSError as e:
                raised.append(e)

        thread = threading.Thread(target=keep_logging, daemon=True)
        thread.start()
        thread.join(60)
        assert not thread.is_alive(), "metrics writing hung on a full disk"
        assert raised and raised[0].errno == errno.ENOSPC
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_killed_local_pod_launcher_leaves_no_worker(tiny_experiment, tmp_path):
    """A SIGKILLed `--local-pod` launcher takes its workers with it (none left on a collective)."""
    cfg = write_config(tiny_experiment, tmp_path / "run")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    launcher = subprocess.Popen([sys.executable, "-m", "phased_jax.cli", "train", "--config",
                                 str(cfg), "--local-pod", "2"], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[str] = []
    end = time.monotonic() + 120
    while len(workers) < 2 and time.monotonic() < end:
        workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                 text=True).stdout.split()
        time.sleep(0.05)
    assert len(workers) == 2
    launcher.kill()
    launcher.wait()

    def alive(pid: str) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
        except FileNotFoundError:
            return False

    end = time.monotonic() + 60
    while any(alive(w) for w in workers) and time.monotonic() < end:
        time.sleep(0.05)
    assert not any(alive(w) for w in workers)
