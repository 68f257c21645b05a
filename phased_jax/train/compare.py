"""`phased-jax compare RUN_DIR RUN_DIR ...`: runs' held-out losses per stage, side by side.

Typical use: a phased run against a one-off run (or a replay run) on the same data. It prints
each run's final loss on every stage's held-out records, the mean, and the mean backward
transfer, then each run's forgetting matrix (`phased_jax.train.forgetting`). Two runs are
compared only when they hold out the same records (same data, `data.eval_fraction`, seed,
stage thresholds): losses on different items would not compare.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phased_jax.data.pipeline import REPORT_NAME
from phased_jax.errors import UsageError
from phased_jax.train import forgetting
from phased_jax.train.runlog import read_events


@dataclass(frozen=True)
class RunMatrix:
    path: str
    heldout: dict[str, Any]
    matrix: forgetting.Matrix


def read_run(path: str) -> RunMatrix:
    """A run's held-out ids (its `data_report.json`) and its matrix (its phase log)."""
    d = Path(path)
    if not d.is_dir():
        raise UsageError(f"{path}: no such directory; give the output_dir of a training run")
    report = d / REPORT_NAME
    if not report.is_file():
        raise UsageError(f"{path}: no {REPORT_NAME}, so not the output_dir of a "
                         "`phased-jax train` run")
    try:
        heldout = json.loads(report.read_text()).get("heldout") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise UsageError(f"{report}: not a readable data report ({e})") from None
    if not heldout.get("stages"):
        raise UsageError(f"{path}: the run held out nothing (data.eval_fraction=0), so it has "
                         "no forgetting matrix; train with --config.data.eval_fraction=0.02")
    events, _ = read_events(d / "logs" / "phase_log.jsonl")
    matrix = forgetting.from_events(events, heldout)
    if not matrix.rows:
        raise UsageError(f"{path}: no phase has ended yet, so no held-out losses to compare")
    return RunMatrix(path, heldout, matrix)


def check_same_items(runs: Sequence[RunMatrix]) -> None:
    """Raise a UsageError unless every run holds out the same records in each stage."""
    first = runs[0]
    ids = {s["stage"]: set(s["ids"]) for s in first.heldout["stages"]}
    for run in runs[1:]:
        other = {s["stage"]: set(s["ids"]) for s in run.heldout["stages"]}
        if other.keys() != ids.keys():
            raise UsageError(f"{first.path} and {run.path} hold out different stages "
                             f"({', '.join(ids)} vs {', '.join(other)}): compare runs on the same "
                             "data, data.thresholds and data.eval_fraction")
        for stage, mine in ids.items():
            if other[stage] != mine:
                differ = len(mine ^ other[stage])
                raise UsageError(f"{first.path} and {run.path} hold out different records in "
                                 f"stage {stage} ({differ} differ of {len(mine | other[stage])}): "
                                 "compare runs with the same data, seed and data.eval_fraction")


def table(runs: Sequence[RunMatrix]) -> str:
    """The runs' final per-stage losses (rows: runs), Markdown."""
    first = runs[0].matrix
    head = ["run", "phases", *(f"stage {j} {lab}" for j, lab in zip(first.stages, first.labels,
                                                                     strict=True)),
            "mean", "mean backward transfer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        m = run.matrix
        final = [m.final().get(j, math.nan) for j in first.stages]
        kept = [v for v in final if not math.isnan(v)]
        mean = sum(kept) / len(kept) if kept else math.nan
        bwt = m.mean_backward_transfer()
        lines.append(f"| {run.path} | {len(m.rows)} | " + " | ".join(_cell(v) for v in final)
                     + f" | {_cell(mean)} | {'-' if math.isnan(bwt) else f'{bwt:+.4f}'} |")
    return "\n".join(lines)


def _cell(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.4f}"


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="phased-jax compare", description=__doc__.split("\n\n")[0],
                                epilog="Each RUN_DIR is a training run's output_dir, trained "
                                       "with data.eval_fraction > 0.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    args = p.parse_args(list(argv))
    runs = [read_run(r) for r in args.runs]
    check_same_items(runs)
    n = sum(len(s["ids"]) for s in runs[0].heldout["stages"])
    print(f"final held-out loss per stage ({n} held-out records, the same in every run; "
          "lower is better)\n")
    print(table(runs))
    for run in runs:
        print()
        print(run.matrix.to_markdown(title=f"{run.path}").rstrip("\n").replace("# ", "## ", 1))
    return 0
