"""`phased-jax train` with the tests' runner hooks, run in a subprocess as a user would:

    python -m tests.runner.hooked_train [--kill-after STEP] [--block-after STEP] [--log-reads]
        --config FILE ...

`--kill-after STEP`: SIGKILL the process right after global step STEP (its checkpoint save
started), as a preempted host dies. `--block-after STEP`: the last process never returns from
`block_forever` after global step STEP, as a worker hung in a collective never does (the local
pod's watchdog test). `--log-reads`: each process appends the record ids of each
step's rows to `<output_dir>/logs/reads-process<i>.jsonl`. On a `--local-pod`, every worker
runs this module with the same hooks.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

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
    for a in words:
        if a == "--kill-after":
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
    worker = [sys.executable, "-m", "tests.runner.hooked_train", *own]
    return run_subcommand("train", lambda: runner.main(rest, hooks, worker))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
