"""`phased-jax score` with a fault, run as a subprocess (each local pod worker runs it too):

    python -m tests.score.hooked_score --kill-chunk K --kill-process I SCORE_ARGS...

Process I SIGKILLs itself as it starts computing its K-th chunk (1-based), as a pod host dies,
once the K-1 chunks before it are on disk.
"""

from __future__ import annotations

import tests.without_torch  # noqa: F401  (before anything imports transformers)

# isort: split
import os
import signal
import sys
import time
from pathlib import Path

import jax

from phased_jax.cli import run_subcommand
from phased_jax.score import run as score_run


def main(argv: list[str]) -> int:
    own, rest = [], []
    words = iter(argv)
    settings = {}
    for a in words:
        if a in ("--kill-chunk", "--kill-process"):
            settings[a] = int(next(words))
            own += [a, str(settings[a])]
        else:
            rest.append(a)
    original, calls = score_run.Scorer.chunk, []

    output = Path(rest[rest.index("--output") + 1])

    def chunk(self, records):
        calls.append(1)
        if (len(calls) == settings.get("--kill-chunk")
                and jax.process_index() == settings.get("--kill-process", 0)):
            # The earlier chunks are on disk first (process 0 writes them while the others go
            # on): the host dies computing chunk K, not in a race with the last write.
            deadline = time.monotonic() + 120
            while (len(list(Path(f"{output}.chunks").glob("chunk-*.json"))) < len(calls) - 1
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, records)

    score_run.Scorer.chunk = chunk
    worker = [sys.executable, "-m", "tests.score.hooked_score", *own]
    return run_subcommand("score", lambda: score_run.main(rest, worker))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
