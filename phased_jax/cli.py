"""`phased-jax SUBCOMMAND ...`: one entry point; each subcommand lives in its own module."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from phased_jax.errors import PhasedError, UsageError
from phased_jax.local_paths import quiet_transformers_notice

# name -> (module with `main(argv) -> int`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("phased_jax.train.runner", "run the phases of a config in order (resumes by itself)"),
    "score": ("phased_jax.score.run", "difficulty from the base model: answer loss or IFD, 1-5"),
    "stats": ("phased_jax.data.stats", "print the paper's Table 1 for a config's data"),
    "convert": ("phased_jax.hf.convert", "HF directory <-> Orbax checkpoint"),
    "plan": ("phased_jax.train.plan", "per-device memory and whether a model fits a device"),
    "compile": ("phased_jax.train.compile", "compile the train/eval steps for a TPU slice, here"),
    "generate": ("phased_jax.generate", "batched greedy/sampled answers for test sets"),
    "compare": ("phased_jax.train.compare", "runs' held-out loss per stage and forgetting matrices"),
}


def usage() -> str:
    lines = ["usage: phased-jax SUBCOMMAND [options]   (phased-jax SUBCOMMAND --help for its options)",
             "", "subcommands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"phased-jax: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    quiet_transformers_notice()  # before the subcommand imports transformers
    module = importlib.import_module(COMMANDS[name][0])
    return run_subcommand(name, lambda: module.main(rest))


def run_subcommand(name: str, call: Callable[[], int | None]) -> int:
    """`call()`'s exit code, with the project's errors as one line on stderr, never a traceback."""
    try:
        return int(call() or 0)
    except UsageError as e:  # the command line or config file: one line, exit 2 (as argparse)
        print(f"phased-jax {name}: error: {e}", file=sys.stderr)
        return 2
    except PhasedError as e:  # the data, checkpoints or devices: exit 1
        print(f"phased-jax {name}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
