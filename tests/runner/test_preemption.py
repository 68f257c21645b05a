"""A preemption notice (SIGTERM) loses no step: the run saves at a step every process agrees on,
says so in one line and exits 75; the rerun ends bitwise where an unbroken run ends.

The notices come from tests/runner/hooked_train.py, at exact moments: after a step (during its
async save where it has one), as a phase's end work starts (its eval and `phases/` write), as
the final export starts. Each run is a session of its own, and the notice goes to its whole
process group, launcher and workers, as a TPU host's runtime sends it.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from phased_jax.preemption import PREEMPTED_EXIT
from tests.runner.runs import POD, phase_events, phase_params, step_lines, train, write_config

pytestmark = pytest.mark.slow
PHASE_ENDS = (14, 24, 29)
LINE = re.compile(r"preempted at global step (\d+) \(phase (\d), step (\d+)\); checkpoint saved; "
                  r"rerun the same command to resume")


def _checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def _stopped(out: Path, proc: subprocess.CompletedProcess) -> int:
    """The step a preempted run stopped at, after checking all it says and leaves there."""
    assert proc.returncode == PREEMPTED_EXIT, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = LINE.findall(proc.stdout)
    assert len(lines) == 1, proc.stdout[-3000:]  # one line, from process 0 only
    step, phase, in_phase = map(int, lines[0])
    starts = (0, *PHASE_ENDS)
    assert 0 < in_phase <= PHASE_ENDS[phase - 1] - starts[phase - 1]
    assert starts[phase - 1] + in_phase == step
    assert "Traceback" not in proc.stdout + proc.stderr
    assert _checkpoints(out)[-1] == step, "the last checkpoint is at the agreed step"
    assert not [p for p in (out / "checkpoints").iterdir() if "tmp" in p.name], "committed"
    assert max(step_lines(out)) == step
    assert phase_events(out, "preempted")[-1]["step"] == step
    return step


def _assert_bitwise(out: Path, reference: Path) -> None:
    assert step_lines(out) == list(range(1, PHASE_ENDS[-1] + 1)), "no step twice, none skipped"
    names = sorted(p.name for p in (reference / "phases").iterdir())
    assert sorted(p.name for p in (out / "phases").iterdir()) == names
    for name in names:
        mine, ref = phase_params(out / "phases" / name), phase_params(reference / "phases" / name)
        assert mine.keys() == ref.keys()
        for k in ref:
            np.testing.assert_array_equal(mine[k], ref[k], err_msg=f"{name} {k}")
    assert (out / "hf" / "model.safetensors").read_bytes() == \
        (reference / "hf" / "model.safetensors").read_bytes()
    assert (out / "forgetting.csv").read_text() == (reference / "forgetting.csv").read_text()


def test_one_process_loses_no_step(tiny_experiment, reference, tmp_path):
    """One process: the notice's own step is saved (zero lost), at a step with no checkpoint
    of its own, and at phase 2's end work (the phase-end checkpoint's async save in flight);
    one during the final export lets the export finish. (During a step's async save: the pod
    test.)"""
    out = tmp_path / "run"
    cfg = write_config(tiny_experiment, out)
    assert _stopped(out, train(cfg, check=False, hooks=("--term-after", "17"))) == 17
    assert 17 % 2, "checkpoint.every_steps=2 saves no checkpoint of its own at step 17"
    assert _stopped(out, train(cfg, check=False,
                               hooks=("--term-in", "finish_phase:2"))) == PHASE_ENDS[1]
    assert (out / "phases" / "phase2-stage2").is_dir(), "the phase-end work finished first"
    last = train(cfg, check=False, hooks=("--term-in", "export"))
    assert last.returncode == 0 and "done: 29 steps" in last.stdout, last.stderr[-3000:]
    assert len(phase_events(out, "preempted")) == 2
    assert [e["phase"] for e in phase_events(out, "eval")] == [1, 2, 3], "each eval once"
    _assert_bitwise(out, reference)


def _truncate_shards(out: Path, step: int, process: int) -> None:
    """Cut in half the largest array file process `process` wrote into checkpoint `step`: only
    that process's read of it fails."""
    data = out / "checkpoints" / str(step) / "state" / f"ocdbt.process_{process}"
    victim = max((p for p in data.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])


def _truncated(out: Path, process: int) -> tuple[int, int]:
    """(the newest checkpoint, the one before), after `_truncate_shards` of the newest."""
    newest, before = _checkpoints(out)[-1], _checkpoints(out)[-2]
    _truncate_shards(out, newest, process)
    return newest, before


def _set_aside_once(out: Path, proc: subprocess.CompletedProcess, bad: tuple[int, int]) -> None:
    """The rerun found the newest checkpoint corrupt: both processes agreed (process 0 reported
    and moved it, once) and went on from the one before."""
    step, before = bad
    assert proc.stdout.count("warning: checkpoint") == 1, proc.stdout[-3000:]
    assert (out / "checkpoints" / f"{step}.corrupt").is_dir()
    assert f"(global step {before + 1})" in proc.stdout, proc.stdout[-3000:]


def test_local_pod_stops_every_worker_at_one_step(tiny_experiment, pod_reference, tmp_path):
    """A local pod (2 processes): a notice to one worker only, during an async save in phase 1;
    to the whole process group at a random step of phase 2, then as phase 2's end work starts,
    then as the export starts. Each time both workers stop at the one agreed step (JAX's sync
    point) and exit 75; the end is bitwise the unbroken pod run.

    Between stops, one process's shards of the newest checkpoint are truncated (process 1's,
    then process 0's): only that process's read fails, yet both set it aside together (process
    0 moves it, once) and go on from the one before."""
    out = tmp_path / "run"
    cfg = write_config(tiny_experiment, out)
    # Once the notice is out, steps of 1 s: JAX's notifier polls each second, and the pod then
    # agrees on the step after the highest any process had reached, so it stops a step or two
    # after the notice, well before a phase ends.
    slow = ("--step-seconds", "1")

    def reads(process: int) -> list[int]:
        lines = (out / "logs" / f"reads-process{process}.jsonl").read_text().splitlines()
        return [json.loads(x)["step"] for x in lines]

    one = train(cfg, *POD, check=False, hooks=(*slow, "--term-worker", "1", "--term-after", "6"))
    first = _stopped(out, one)
    assert 6 <= first < PHASE_ENDS[0], first
    assert reads(0)[-1] == reads(1)[-1] == first, "both workers stopped at the agreed step"
    bad = _truncated(out, process=1)
    notice = random.Random(24).randrange(first + 2, PHASE_ENDS[0] + 4)  # phase 2's first steps
    second = train(cfg, *POD, check=False, hooks=(*slow, "--term-after", str(notice)))
    mid = _stopped(out, second)
    _set_aside_once(out, second, bad)
    assert notice <= mid < PHASE_ENDS[1], (notice, mid)
    bad = _truncated(out, process=0)
    third = train(cfg, *POD, check=False, hooks=(*slow, "--term-in", "finish_phase:2"))
    end = _stopped(out, third)
    _set_aside_once(out, third, bad)
    assert PHASE_ENDS[1] <= end < PHASE_ENDS[2]
    assert reads(0)[-1] == reads(1)[-1] == end
    last = train(cfg, *POD, check=False, hooks=("--term-in", "export"))
    assert last.returncode == 0 and "done: 29 steps" in last.stdout, last.stdout[-3000:]
    _assert_bitwise(out, pod_reference)


def test_no_readable_checkpoint_stops_with_nothing_moved(tiny_experiment, reference, tmp_path):
    """Every checkpoint's metadata gone at once (a storage mount down): one line, exit 1,
    nothing renamed; `checkpoint.on_unreadable=restart` sets them aside and starts over."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    cfg = write_config(tiny_experiment, out)
    steps = _checkpoints(out)
    for step in steps:
        (out / "checkpoints" / str(step) / "state" / "_METADATA").unlink()
    fast = "--config.checkpoint.retry_backoff_s=0"
    stopped = train(cfg, fast, check=False)
    assert stopped.returncode == 1
    errors = [line for line in stopped.stderr.splitlines() if line.strip()]
    assert errors[-1].startswith(f"phased-jax train: error: none of the {len(steps)} checkpoints "
                                 f"in {out / 'checkpoints'} could be read (checkpoint "
                                 f"{steps[-1]}: state/_METADATA is missing); this looks like the "
                                 "storage, not the checkpoints: nothing was moved"), errors[-1]
    assert "Traceback" not in stopped.stderr
    assert _checkpoints(out) == steps and not list((out / "checkpoints").glob("*.corrupt*"))
    restarted = train(cfg, fast, "--config.checkpoint.on_unreadable=restart")
    assert (f"checkpoint.on_unreadable=restart: none of the {len(steps)} checkpoints could be "
            "read; all set aside, starting over from step 0") in restarted.stdout
    assert sorted(p.name for p in (out / "checkpoints").glob("*.corrupt")) == sorted(
        f"{s}.corrupt" for s in steps)
    assert "from its first step (global step 1)" in restarted.stdout
