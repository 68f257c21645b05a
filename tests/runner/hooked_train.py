"""`phased-jax train` with the tests' runner hooks, run in a subprocess as a user would:

    python -m tests.runner.hooked_train [--kill-after STEP] [--block-after STEP] [--log-reads]
        [--term-after STEP | --term-in finish_phase:K | --term-in export] [--term-worker I]
        [--step-seconds S] --config FILE ...

`--kill-after STEP`: SIGKILL the process right after global step STEP (its checkpoint save
started), as a preempted host dies. `--block-after STEP`: the last process never returns from
`block_forever` after global step STEP, as a worker hung in a collective never does (the local
pod's watchdog test). `--log-reads`: each process appends the record ids of each
step's rows to `<output_dir>/logs/reads-process<i>.jsonl`.

Preemption notices (SIGTERM), sent by process 0 to its whole process group (as a TPU host's
runtime does; the tests start each run in a session of its own): `--term-after STEP` right after
global step STEP (its checkpoint save started, so during an async save where it has one);
`--term-in finish_phase:K` as phase K's end work starts (its eval, its `phases/` write);
`--term-in export` as the final export starts. `--term-worker I`: worker I sends it to itself
only. `--step-seconds S`: once the notice is sent, each step takes S seconds more, so that a
pod's processes agree on a step (JAX's preemption service polls each second) within a few steps.
On a `--local-pod`, every worker runs this module with the same hooks.
"""

from __future__ import annotations

import tests.without_torch  # noqa: F401  (before anything imports transformers)

# isort: split
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import jax

from phased_jax.cli import run_subcommand
from phased_jax.train import runner


def kill_after(global_step: int) -> runner.StepHook:
    def hook(run: runner.PhaseRunner, k: int, steps_done: int) -> None:
        if run.starts[k] + steps_done == global_step:
            os.kill(os.getpid(), signal.SIGKILL)
    return hook


def block_after(global_step: int) -> runner.StepHook:
    def hook(run: runner.PhaseRunner, k: int, steps_done: int) -> None:
        if run.starts[k] + steps_done == global_step and (
                jax.process_index() == jax.process_count() - 1):
            block_forever()
    return hook


def block_forever() -> None:
    threading.Event().wait()


def _sent_marker(run: runner.PhaseRunner) -> Path:
    """Written as the notice is sent; one per run (each run is a process group of its own)."""
    return run.out / "logs" / f"notice-sent-{os.getpgid(0)}"


def send_term(run: runner.PhaseRunner, worker: int | None) -> None:
    """A preemption notice: to this process group from process 0, or to worker `worker` only."""
    if jax.process_index() == (0 if worker is None else worker):
        _sent_marker(run).touch()
    if worker is None:
        if jax.process_index() == 0:
            os.killpg(os.getpgid(0), signal.SIGTERM)
    elif jax.process_index() == worker:
        os.kill(os.getpid(), signal.SIGTERM)


def term_after(global_step: int, worker: int | None) -> runner.StepHook:
    def hook(run: runner.PhaseRunner, k: int, steps_done: int) -> None:
        if run.starts[k] + steps_done == global_step:
            send_term(run, worker)
    return hook


def term_in(moment: str, worker: int | None) -> None:
    """Send the notice as `finish_phase:K` or `export` starts (a patched PhaseRunner method)."""
    name, _, phase = moment.partition(":")
    method = {"finish_phase": "finish_phase", "export": "_export_final"}[name]
    original = getattr(runner.PhaseRunner, method)

    def patched(self, *args, **kwargs):
        if name == "export" or args[0] + 1 == int(phase):
            send_term(self, worker)
        return original(self, *args, **kwargs)

    setattr(runner.PhaseRunner, method, patched)


def step_seconds(seconds: float) -> runner.StepHook:
    def hook(run: runner.PhaseRunner, k: int, steps_done: int) -> None:
        if _sent_marker(run).exists():
            time.sleep(seconds)
    return hook


def log_reads(run: runner.PhaseRunner, k: int, steps_done: int) -> None:
    ids = run.data.phases[k].examples.record_ids
    rows = [[] if r is None else ids[r].tolist() for r in run.loaders[k].rows(steps_done - 1)]
    path = run.out / "logs" / f"reads-process{jax.process_index()}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"step": run.starts[k] + steps_done, "rows": rows}) + "\n")


def main(argv: list[str]) -> int:
    own, rest, hooks = [], [], []
    words = iter(argv)
    term: dict[str, str] = {}
    for a in words:
        if a in ("--term-after", "--term-in", "--term-worker", "--step-seconds"):
            term[a] = next(words)
            own += [a, term[a]]
        elif a == "--kill-after":
            step = next(words)
            own += [a, step]
            hooks.append(kill_after(int(step)))
        elif a == "--block-after":
            step = next(words)
            own += [a, step]
            hooks.append(block_after(int(step)))
        elif a == "--log-reads":
            own.append(a)
            hooks.append(log_reads)
        else:
            rest.append(a)
    worker_only = int(term["--term-worker"]) if "--term-worker" in term else None
    if "--term-after" in term:
        hooks.append(term_after(int(term["--term-after"]), worker_only))
    if "--term-in" in term:
        term_in(term["--term-in"], worker_only)
    if "--step-seconds" in term:
        hooks.append(step_seconds(float(term["--step-seconds"])))
    worker = [sys.executable, "-m", "tests.runner.hooked_train", *own]
    return run_subcommand("train", lambda: runner.main(rest, hooks, worker))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
