"""A local pod that stops making progress is stopped by its launcher's watchdog, with every
worker's Python stacks on file and one line naming the last step (issue 21, "Why" 5)."""

from __future__ import annotations

import os
import re
import time

from phased_jax.distributed import WATCHDOG_EXIT
from tests.runner.runs import step_lines, train, write_config

BLOCK_AFTER = 1
WATCHDOG_S = 5


def test_watchdog_stops_a_pod_with_a_blocked_worker(tiny_experiment, tmp_path):
    """Process 1 blocks in a hook after step 1; process 0 then waits in step 2's collectives.

    The watchdog (short here) dumps both workers' stacks, kills them and exits in one line."""
    out = tmp_path / "run"
    started = time.monotonic()
    proc = train(write_config(tiny_experiment, out), "--local-pod", "2", "--local-devices", "1",
                 "--watchdog-s", str(WATCHDOG_S), "--block-after", str(BLOCK_AFTER), check=False)
    took = time.monotonic() - started
    assert proc.returncode == WATCHDOG_EXIT, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, proc.stderr[-3000:]
    stacks = out / "logs" / "local_pod_stacks.txt"
    assert errors[0] == (f"phased-jax train: error: the local pod made no progress for "
                         f"{WATCHDOG_S} s after global step {BLOCK_AFTER}; stopped every worker; "
                         f"their Python stacks are in {stacks}")
    assert max(step_lines(out)) == BLOCK_AFTER
    text = stacks.read_text()
    sections = re.split(r"^# process (\d) \(pid (\d+)\), last global step (\S+)$", text,
                        flags=re.M)
    assert [(p, s) for p, _, s in zip(sections[1::4], sections[2::4], sections[3::4],
                                      strict=True)] == [("0", str(BLOCK_AFTER)),
                                                        ("1", str(BLOCK_AFTER))]
    blocked, waiting = sections[8], sections[4]
    assert 'in block_forever' in blocked and "hooked_train.py" in blocked, blocked
    assert "Current thread" in waiting or "Thread 0x" in waiting, waiting  # a faulthandler dump
    for pid in map(int, sections[2::4]):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            pass
        else:
            raise AssertionError(f"worker {pid} outlived its pod")
    assert took < 90, f"the watchdog took {took:.0f}s"  # about 35 s on 2 idle cores


def test_workers_get_no_launcher_flags():
    """`--watchdog-s` (like `--local-pod`) is the launcher's: the workers' command lacks it."""
    from phased_jax.distributed import without_flags
    from phased_jax.train.runner import LAUNCHER_FLAGS

    argv = ["--config", "c.py", "--local_pod", "2", "--watchdog_s=5", "--local_devices", "1",
            "--watchdog_s", "7", "--config.seed=3"]
    assert without_flags(argv, LAUNCHER_FLAGS) == ["--config", "c.py", "--config.seed=3"]
