"""The demo's report: one Markdown page and its PNG plots, so a run can be read at a glance.

`write_report` reads each run's training metrics and test answers, scores the answers with the
offline judge (`phased_jax.demo.judge`), and writes `report.md`, `loss.png`, `accuracy.png`,
`winrate.png` and `results.json` (the numbers behind the page) under `out_dir`. Every file is
written to a temporary name and renamed, so a reader never sees half a report.

The first run in `runs` is the candidate (phased); it is judged against each other run
(one-off), from the candidate's side, as in the paper's tables.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from phased_jax.demo import judge  # noqa: E402
from phased_jax.demo.tasks import THRESHOLDS, phase_stats  # noqa: E402
from phased_jax.fileio import iter_jsonl, read_jsonl, write_bytes_atomic, write_text_atomic  # noqa: E402

SETS = (*judge.BANDS, "all")


class ReportError(ValueError):
    """An input file of the report is malformed; the message names file and line."""


# --- reading ----------------------------------------------------------------------------

def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Training log lines that carry a numeric `loss` and `step`, in file order.

    Lines without a loss (eval or timing records) are skipped. A torn last line (a kill
    mid-write) is skipped and reported; any other line that is not JSON is an error naming
    file:line, since a corrupt log should not plot as a clean curve.
    """
    def torn() -> None:
        print(f"note: skipped a torn last line in {path} (a kill mid-write)")

    rows = []
    for lineno, obj in iter_jsonl(path, ReportError, on_torn_tail=torn):
        loss, step = obj.get("loss"), obj.get("step")
        if not isinstance(loss, int | float) or isinstance(loss, bool) or math.isnan(loss):
            continue
        if not isinstance(step, int | float) or isinstance(step, bool):
            raise ReportError(f"{path}:{lineno}: a loss line needs a numeric 'step'")
        rows.append(obj)
    return rows


def _save_fig(fig, path: Path) -> None:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


# --- plots ------------------------------------------------------------------------------

def plot_loss(metrics: Mapping[str, list[dict[str, Any]]],
              boundaries: Mapping[str, list[int]], path: Path) -> None:
    """Training loss per global step, one panel per run, dashed lines at phase boundaries."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), sharey=True,
                             squeeze=False)
    for ax, (name, rows) in zip(axes[0], metrics.items(), strict=True):
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
        for k, b in enumerate(boundaries.get(name, []), 1):
            ax.axvline(b, color="grey", ls="--", lw=1)
            ax.text(b, 0.98, f"phase {k + 1} starts ", transform=ax.get_xaxis_transform(),
                    rotation=90, ha="right", va="top", fontsize=8, color="grey")
        ax.set_title(name)
        ax.set_xlabel("global step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss")
    _save_fig(fig, path)


def _bar_groups(ax, groups: list[str], series: Mapping[str, list[float]], fmt: str) -> None:
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=8)
    ax.set_xticks(range(len(groups)), groups)


def plot_accuracy(acc: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """Exact-match accuracy by difficulty band, one bar per run."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    series = {name: [100 * _acc_of(a, s) for s in SETS] for name, a in acc.items()}
    _bar_groups(ax, [judge.BAND_LABELS[s] for s in SETS], series, "{:.0f}")
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 110)
    ax.legend()
    _save_fig(fig, path)


def plot_winrate(comparisons: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """Win / tie / lose shares per test set, stacked, one panel per comparison."""
    fig, axes = plt.subplots(1, len(comparisons), figsize=(6 * len(comparisons), 3.2),
                             squeeze=False)
    colors = {"win": "tab:green", "tie": "tab:grey", "lose": "tab:red"}
    for ax, (title, cmp) in zip(axes[0], comparisons.items(), strict=True):
        labels = [f"{judge.BAND_LABELS[s]}\nWinRate {_points(cmp[s]['winrate'])}"
                  for s in SETS][::-1]
        left = [0.0] * len(SETS)
        for o in judge.OUTCOMES:
            shares = [100 * cmp[s][o] / cmp[s]["n"] if cmp[s]["n"] else 0 for s in SETS][::-1]
            ax.barh(labels, shares, left=left, color=colors[o], label=o)
            left = [a + b for a, b in zip(left, shares, strict=True)]
        ax.set_xlim(0, 100)
        ax.set_xlabel("% of items")
        ax.set_title(title)
        ax.legend(ncol=3, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    _save_fig(fig, path)


# --- Markdown ---------------------------------------------------------------------------

def _acc_of(a: Mapping[str, Any], s: str) -> float:
    return a["all"]["accuracy"] if s == "all" else a["by_band"][s]["accuracy"]


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"


def _points(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:+.2f}"


def phase_table(train_path: Path | None, test_path: Path) -> str:
    """Paper Table 1's columns for the demo data: size and mean difficulty per phase."""
    test = phase_stats(read_jsonl(test_path))
    train = phase_stats(read_jsonl(train_path)) if train_path else None
    bounds = ["[1, {})", "[{}, {})", "[{}, 5]"]
    edges = [(THRESHOLDS[0],), THRESHOLDS, (THRESHOLDS[1],)]
    rows = []
    for k, te in enumerate(test):
        row = [f"phase {k + 1} {bounds[k].format(*edges[k])}"]
        if train:
            n_train = sum(s["n"] for s in train)
            row += [train[k]["n"], _pct(train[k]["n"] / n_train), f"{train[k]['mean_score']:.2f}"]
        rows.append(row + [te["n"], f"{te['mean_score']:.2f}"])
    header = ["phase (difficulty)"]
    if train:
        header += ["train items", "share", "mean difficulty"]
    return _table(header + ["test items", "test mean difficulty"], rows)


def winrate_table(cmp: Mapping[str, Mapping[str, Any]], title: str) -> str:
    """The paper's layout: test sets as columns, win/tie/lose counts and WinRate as rows."""
    header = [title] + [f"{judge.BAND_LABELS[s]} (n={cmp[s]['n']})" for s in SETS]
    rows = [
        ["win / tie / lose"] + [f"{cmp[s]['win']} / {cmp[s]['tie']} / {cmp[s]['lose']}" for s in SETS],
        ["WinRate (points)"] + [_points(cmp[s]["winrate"]) for s in SETS],
    ]
    return _table(header, rows)


def _intro(names: list[str]) -> str:
    a, others = names[0], ", ".join(names[1:]) or "(none)"
    return f"""# Phased instruction fine-tuning: demo report

This demo runs the method of Pang et al. (2024) end to end on a tiny model on CPU. A generated
instruction set of word tasks (chains of one to three steps), each with a difficulty score from 1 to 5
(standing in for GPT-4's rating), is split at the paper's thresholds
[1, {THRESHOLDS[0]}) / [{THRESHOLDS[0]}, {THRESHOLDS[1]}) / [{THRESHOLDS[1]}, 5] into three
phases. **{a}** trains on the phases in order of difficulty, each phase a fresh run from the
previous weights; **{others}** trains on all of the data at once with the same token budget.
Both then answer a held-out test split covering every difficulty band.

How to read it:
- *Loss*: the phased curve jumps at each phase boundary (dashed lines), where harder, unseen
  data arrives with a fresh learning-rate schedule and optimizer state.
- *Accuracy*: exact match against the reference answer, by difficulty band. The paper's test
  sets have no single right answer; ours do, so this is the direct measure.
- *Win / tie / lose*: the paper's protocol with an offline judge in GPT-4's place: each answer
  is scored 1-10 (10 = correct, else by similarity to the reference), every pair twice with the
  order swapped; win = 2 wins or 1 win + 1 tie, tie = 2 ties or 1 win + 1 loss, lose = the
  mirror. WinRate = (win + tie/2) / n - 0.5, in points, from {a}'s side: positive means {a}
  is better. Each difficulty band is one "test set"; "all" is their size-weighted average.
- *After each phase*: the phased model's accuracy at each phase boundary, to see what each
  phase teaches and what the next one makes it forget.
- The model here starts from random weights, not from a pretrained LLM, and trains a few
  minutes; read the comparison as the method's behaviour at this scale, not the paper's
  effect size.
"""


def _no_nan(x: Any) -> Any:
    """NaN (an empty band) as null, so results.json is strict JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, Mapping):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_no_nan(v) for v in x]
    return x


def write_report(out_dir: str | Path, *, runs: Mapping[str, Mapping[str, Any]],
                 test_path: str | Path, timings: Mapping[str, float],
                 extra: Mapping[str, Any] | None = None,
                 train_path: str | Path | None = None,
                 phase_answers: Mapping[str, str | Path] | None = None) -> Path:
    """Write report.md, loss.png, accuracy.png, winrate.png, results.json; return report.md.

    runs: name -> {"metrics_jsonl": path, "phase_boundaries": [global steps], "answers": path};
    the first run is judged against each of the others. timings: stage -> seconds, shown in
    order. extra: key -> value; scalars are shown under "Setup" (model size, seed...), all go
    to results.json (accuracy and win rates are computed here, not read from it). train_path:
    the training data, for the phase table (else only the test split is tabulated).
    phase_answers: label -> answers of the first run's model at each phase boundary, in order
    (a table of accuracy by band after each phase).
    """
    if not runs:
        raise ReportError("write_report needs at least one run")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    test_path = Path(test_path)
    names = list(runs)
    metrics = {n: read_metrics(r["metrics_jsonl"]) for n, r in runs.items()}
    boundaries = {n: list(r.get("phase_boundaries") or []) for n, r in runs.items()}
    acc = {n: judge.accuracy(r["answers"], test_path) for n, r in runs.items()}
    phase_acc = {k: judge.accuracy(v, test_path) for k, v in (phase_answers or {}).items()}
    comparisons = {f"{names[0]} vs {b}": judge.pairwise(runs[names[0]]["answers"],
                                                         runs[b]["answers"], test_path)["by_set"]
                   for b in names[1:]}

    plot_loss(metrics, boundaries, out / "loss.png")
    plot_accuracy(acc, out / "accuracy.png")
    if comparisons:
        plot_winrate(comparisons, out / "winrate.png")

    md = [_intro(names)]
    shown = {k: v for k, v in (extra or {}).items() if isinstance(v, str | int | float | bool)}
    if shown:
        md += ["## Setup", "",
               *(f"- **{k}**: {v:.4g}" if isinstance(v, float) else f"- **{k}**: {v}"
                 for k, v in shown.items()), ""]
    md += ["## Phases", "", phase_table(Path(train_path) if train_path else None, test_path), ""]
    md += ["## Training loss", "", "![training loss](loss.png)", ""]
    md += ["| run | logged steps | first loss | last loss | phase boundaries (step) |",
           "|---|---|---|---|---|"]
    for n, rows in metrics.items():
        first = f"{rows[0]['loss']:.3f}" if rows else "n/a"
        last = f"{rows[-1]['loss']:.3f}" if rows else "n/a"
        md.append(f"| {n} | {len(rows)} | {first} | {last} | "
                  f"{', '.join(map(str, boundaries[n])) or '-'} |")
    md += ["", "## Accuracy by difficulty (exact match)", "", "![accuracy](accuracy.png)", ""]
    md.append(_table(["test set"] + names,
                     [[judge.BAND_LABELS[s]] + [_pct(_acc_of(acc[n], s)) for n in names]
                      for s in SETS]))
    tasks = list(acc[names[0]]["by_task"])
    md += ["", "By task family:", ""]
    md.append(_table(["task", "n"] + names,
                     [[t, acc[names[0]]["by_task"][t]["n"]]
                      + [_pct(acc[n]["by_task"][t]["accuracy"]) for n in names] for t in tasks]))
    if phase_acc:
        md += ["", f"{names[0]}, after each phase:", ""]
        md.append(_table(["model"] + [judge.BAND_LABELS[s] for s in SETS],
                         [[k] + [_pct(_acc_of(a, s)) for s in SETS]
                          for k, a in phase_acc.items()]))
    if comparisons:
        md += ["", "## Win / tie / lose (offline judge, both orders)", "",
               "![win tie lose](winrate.png)", ""]
        for title, cmp in comparisons.items():
            md += [winrate_table(cmp, title), ""]
    md += ["", "## Timing", ""]
    md.append(_table(["stage", "seconds"],
                     [[k, f"{v:.1f}"] for k, v in timings.items()]
                     + [["**total**", f"**{sum(timings.values()):.1f}**"]]))
    md += ["", "## Files", "", f"- test set: `{test_path}`"]
    if train_path:
        md.append(f"- training data: `{train_path}`")
    for n, r in runs.items():
        md.append(f"- {n}: metrics `{r['metrics_jsonl']}`, answers `{r['answers']}`")
    md.append(f"- this report and its plots: `{out}`")

    results = {"accuracy": acc, "accuracy_after_phase": phase_acc, "winrate": comparisons,
               "timings": dict(timings),
               "phase_boundaries": boundaries, "extra": dict(extra or {})}
    write_text_atomic(out / "results.json",
                json.dumps(_no_nan(results), indent=2, default=str, allow_nan=False) + "\n")
    path = out / "report.md"
    write_text_atomic(path, "\n".join(md) + "\n")
    return path
