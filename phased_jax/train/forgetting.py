"""The forgetting matrix: each stage's held-out loss after each phase, and what it says.

Row k is the run after phase k, column j the eval loss on stage j's held-out records
(`phased_jax.data.splits`). The runner logs each phase end's losses to the phase log, so the
matrix is rebuilt from that log at the run's end (a resumed run recomputes nothing and loses no
row) and written as `<output_dir>/forgetting.csv` and `forgetting.md`. `phased-jax compare`
reads the same log of several runs.

- forgetting of stage j: its final loss minus the best (lowest) loss it had after an earlier
  phase; > 0 means later phases undid some of what it had learnt.
- backward transfer of stage j: its loss after the phase that trained it minus its final loss,
  over the stages trained before the last phase; < 0 means forgetting (as in GEM's BWT, with
  loss in place of accuracy). Its mean is the run's one-number summary.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phased_jax.fileio import write_text_atomic

CSV_NAME, MD_NAME = "forgetting.csv", "forgetting.md"


@dataclass(frozen=True)
class Row:
    phase: int  # 1-based, in training order
    name: str  # the phase's name ("1", "1+3", "oneoff", "random-2")
    step: int  # global step
    losses: dict[str, float]  # stage name -> eval loss


@dataclass(frozen=True)
class Matrix:
    stages: tuple[str, ...]  # stage names ("1", "2", "3" or "all")
    labels: tuple[str, ...]  # their score ranges
    rows: tuple[Row, ...]
    trained_in: dict[str, int]  # stage -> the phase (1-based) whose data is that stage's

    def final(self) -> dict[str, float]:
        return dict(self.rows[-1].losses) if self.rows else {}

    def forgetting(self) -> dict[str, float]:
        """Per stage: final loss minus the best loss after an earlier phase (nan: no earlier)."""
        out = {}
        for j in self.stages:
            earlier = [r.losses[j] for r in self.rows[:-1] if j in r.losses]
            out[j] = self.rows[-1].losses[j] - min(earlier) if earlier else math.nan
        return out

    def backward_transfer(self) -> dict[str, float]:
        """Per stage trained before the last phase: loss after its own phase minus final loss."""
        last = self.rows[-1].phase if self.rows else 0
        own = {r.phase: r for r in self.rows}
        out = {}
        for j in self.stages:
            k = self.trained_in.get(j)
            out[j] = (own[k].losses[j] - self.rows[-1].losses[j]
                      if k is not None and k < last and k in own else math.nan)
        return out

    def mean_backward_transfer(self) -> float:
        values = [v for v in self.backward_transfer().values() if not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan

    # -- files -------------------------------------------------------------------------------
    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["row", "phase", "step", *(f"stage {j}" for j in self.stages), "mean"])
        for r in self.rows:
            values = [r.losses.get(j, math.nan) for j in self.stages]
            w.writerow([f"after phase {r.phase}", r.name, r.step, *map(_num, values),
                        _num(_mean(values))])
        for name, per in (("forgetting", self.forgetting()),
                          ("backward transfer", self.backward_transfer())):
            values = [per[j] for j in self.stages]
            w.writerow([name, "", "", *map(_num, values), _num(_mean(values))])
        return buf.getvalue()

    def to_markdown(self, title: str = "Forgetting matrix") -> str:
        head = ["", *(f"stage {j} {lab}" for j, lab in zip(self.stages, self.labels, strict=True)),
                "mean"]
        lines = [f"# {title}", "",
                 "Eval loss on each stage's held-out records after each phase (lower is better).",
                 "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            values = [r.losses.get(j, math.nan) for j in self.stages]
            lines.append(f"| after phase {r.phase} ({r.name}, step {r.step}) | "
                         + " | ".join(map(_cell, values)) + f" | {_cell(_mean(values))} |")
        for name, per in (("forgetting (final - best earlier)", self.forgetting()),
                          ("backward transfer (own phase - final)", self.backward_transfer())):
            values = [per[j] for j in self.stages]
            lines.append(f"| {name} | " + " | ".join(_cell(v, sign=True) for v in values)
                         + f" | {_cell(_mean(values), sign=True)} |")
        bwt = self.mean_backward_transfer()
        lines += ["", f"Mean backward transfer: {_cell(bwt, sign=True)} "
                      "(< 0: later phases raised the loss of earlier stages, i.e. forgetting)."]
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        out = Path(out_dir)
        write_text_atomic(out / CSV_NAME, self.to_csv())
        write_text_atomic(out / MD_NAME, self.to_markdown())
        return out / CSV_NAME, out / MD_NAME


def _mean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _num(v: float) -> str:
    return "" if math.isnan(v) else f"{v:.6g}"


def _cell(v: float, sign: bool = False) -> str:
    return "-" if math.isnan(v) else (f"{v:+.4f}" if sign else f"{v:.4f}")


def from_events(events: Sequence[dict[str, Any]], heldout: dict[str, Any]) -> Matrix:
    """The matrix of a run's phase-end `eval` events (its phase log) and the `heldout` section
    of its `data_report.json`. Each event names the score stages its phase trained on
    (`trained_stages`; none for one-off and random stages, whose backward transfer is then
    undefined)."""
    stages = tuple(s["stage"] for s in heldout.get("stages", ()))
    labels = tuple(s["label"] for s in heldout.get("stages", ()))
    rows: dict[int, Row] = {}
    trained_in: dict[str, int] = {}
    for e in events:
        if e.get("event") == "eval" and e.get("at_phase_end", True) and e.get("stage_losses"):
            k = int(e["phase"])
            rows[k] = Row(k, str(e.get("name", "")), int(e["step"]),
                          {str(j): float(v) for j, v in e["stage_losses"].items()})
            trained_in.update({str(j): k for j in e.get("trained_stages", ())})
    return Matrix(stages, labels, tuple(rows[k] for k in sorted(rows)), trained_in)
