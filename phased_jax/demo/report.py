"""The demo's report: one Markdown page and its PNG plots, so a run can be read at a glance.

`write_report` reads each run's training metrics and test answers, scores the answers with the
offline judge (`phased_jax.demo.judge`), and writes `report.md`, `loss.png`, `accuracy.png`,
`forgetting.png`, `winrate.png` and `results.json` (the numbers behind the page) under
`out_dir`. Every file is written to a temporary name and renamed, so a reader never sees half
a report.

Every arm is judged against one-off (BASELINE), from the arm's side, as in the paper's tables;
the follow-up variants (`FOLLOW_UP`) also against the arm they vary, by accuracy.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from phased_jax.demo import judge, stats  # noqa: E402
from phased_jax.demo.config import ARM_NOTES, ARMS, FOLLOW_UP, HEADROOM  # noqa: E402
from phased_jax.demo.tasks import THRESHOLDS, phase_stats  # noqa: E402
from phased_jax.fileio import iter_jsonl, read_jsonl, write_bytes_atomic, write_text_atomic  # noqa: E402

SETS = (*judge.BANDS, "all")
BASELINE = "oneoff"  # every other arm is judged against it


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
    """Training loss per global step, one panel per run (log scale), dashed lines at phase
    boundaries."""
    cols = min(len(metrics), 2)
    nrows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax, (name, rows) in zip(axes.flat, metrics.items(), strict=False):  # spare axes hidden
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
        for k, b in enumerate(boundaries.get(name, []), 2):
            ax.axvline(b, color="grey", ls="--", lw=1)
            ax.text(b, 0.98, f"phase {k} starts ", transform=ax.get_xaxis_transform(),
                    rotation=90, ha="right", va="top", fontsize=8, color="grey")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("global step")
        ax.set_ylabel("training loss (log scale)")
        ax.set_yscale("log")  # the first steps' loss would otherwise flatten the rest
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    _save_fig(fig, path)


def plot_accuracy(summary: Mapping[str, Mapping[str, tuple[float, float]]], n_seeds: int,
                  path: Path) -> None:
    """Exact match by difficulty band: one bar per arm at the mean over seeds, the error bar
    one standard deviation; the legend sits below the axes, clear of the labels."""
    fig, ax = plt.subplots(figsize=(8, 4))
    arms = list(summary)
    width = 0.8 / max(len(arms), 1)
    for i, arm in enumerate(arms):
        xs = [g + (i - (len(arms) - 1) / 2) * width for g in range(len(SETS))]
        means = [100 * summary[arm][s][0] for s in SETS]
        sds = [100 * summary[arm][s][1] for s in SETS]
        bars = ax.bar(xs, means, width, yerr=sds, capsize=3, label=arm)
        ax.bar_label(bars, labels=[f"{m:.0f}" for m in means], fontsize=8, padding=2,
                     label_type="edge")
    ax.set_xticks(range(len(SETS)), [judge.BAND_LABELS[s] for s in SETS])
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"mean over {n_seeds} seeds, error bars: 1 sd", fontsize=10)
    ax.legend(ncol=min(len(arms), 3), loc="upper center", bbox_to_anchor=(0.5, -0.12),
              frameon=False)
    _save_fig(fig, path)


def plot_forgetting(after: Mapping[str, Mapping[str, Mapping[str, tuple[float, float]]]],
                    n_seeds: int, path: Path) -> None:
    """Exact match after each phase, one panel per band: what a later phase takes from the
    bands an earlier one taught. One line per arm (mean over seeds, error bars 1 sd).
    after: arm -> "after phase k" -> band -> (mean, sd)."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True, sharey=True)
    arms = list(after)
    for ax, band in zip(axes.flat, SETS, strict=True):
        for i, arm in enumerate(arms):
            labels = list(after[arm])
            xs = [k + (i - (len(arms) - 1) / 2) * 0.04 for k in range(1, len(labels) + 1)]
            ax.errorbar(xs, [100 * after[arm][lab][band][0] for lab in labels],
                        yerr=[100 * after[arm][lab][band][1] for lab in labels], marker="o",
                        capsize=3, lw=1.5, label=arm, ls=":" if arm == "reverse" else "-")
        ax.set_title(judge.BAND_LABELS[band], fontsize=10)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    n_phases = max((len(v) for v in after.values()), default=0)
    for ax in axes[1]:
        ax.set_xticks(range(1, n_phases + 1), [f"after phase {k}" for k in range(1, n_phases + 1)])
    for ax in axes[:, 0]:
        ax.set_ylabel("exact match (%)")
    fig.suptitle(f"exact match after each phase, mean over {n_seeds} seeds (error bars 1 sd)",
                 fontsize=11)
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, ncol=min(len(arms), 4), loc="lower center", frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    _save_fig(fig, path)


def plot_winrate(comparisons: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """Win / tie / lose shares per test set (pooled over seeds), stacked, one panel per
    comparison."""
    fig, axes = plt.subplots(len(comparisons), 1, figsize=(7, 3.4 * len(comparisons)),
                             squeeze=False)
    colors = {"win": "tab:green", "tie": "tab:grey", "lose": "tab:red"}
    for ax, (title, cmp) in zip(axes[:, 0], comparisons.items(), strict=True):
        labels = [f"{judge.BAND_LABELS[s]}\nWinRate {_points(cmp[s]['winrate'])}"
                  for s in SETS][::-1]
        left = [0.0] * len(SETS)
        for o in judge.OUTCOMES:
            shares = [100 * cmp[s][o] / cmp[s]["n"] if cmp[s]["n"] else 0 for s in SETS][::-1]
            ax.barh(labels, shares, left=left, color=colors[o], label=o)
            left = [a + b for a, b in zip(left, shares, strict=True)]
        ax.set_xlim(0, 100)
        ax.set_xlabel("% of items (all seeds)")
        ax.set_title(title)
        ax.legend(ncol=3, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25),
                  frameon=False)
    fig.tight_layout()
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


def _arm_line(arm: str) -> str:
    fields = " ".join(f"{k}={v}" for k, v in ARMS.get(arm, {}).items())
    return f"- **{arm}**" + (f" (`{fields}`)" if fields else "") + (
        f": {ARM_NOTES[arm]}" if arm in ARM_NOTES else "")


def _intro(arms: list[str], n_seeds: int) -> str:
    arm_lines = "\n".join(_arm_line(a) for a in arms)
    follow = [a for a in arms if FOLLOW_UP.get(a) in arms]
    follow_up = (f"The follow-up question, fixed before those arms were run: does "
                 f"{' or '.join(follow)} keep what the earlier phases taught, and so beat "
                 f"{', '.join(sorted({FOLLOW_UP[a] for a in follow}))} (and {BASELINE})? "
                 f"Each is compared with both.\n\n" if follow else "")
    return f"""# Phased instruction fine-tuning: demo report

This demo runs the method of Pang et al. (2024) end to end on a tiny model on CPU. A base model
is first pretrained on plain prose that states word facts ("naduk backwards is kudan. kudan in
capitals is KUDAN. ..."), without any instruction. A generated instruction set of word tasks
(chains of one to three steps), each with a difficulty score from 1 to 5 (standing in for
GPT-4's rating), is split at the paper's thresholds [1, {THRESHOLDS[0]}) /
[{THRESHOLDS[0]}, {THRESHOLDS[1]}) / [{THRESHOLDS[1]}, 5] into three phases. Every arm tunes the
same base on the same examples for the same epochs per phase; they differ only in:

{arm_lines}

{follow_up}Every arm runs on {n_seeds} seeds (the seed orders the examples; data and base are
shared) and answers a held-out test split covering every difficulty band.

How to read it:
- *Accuracy*: exact match against the reference answer, by difficulty band, mean +- sd over
  seeds. The paper's test sets have no single right answer; ours do, so this is the direct
  measure.
- *Two-level bootstrap*: each (seed, test item) answered by both arms is a pair; a resample
  draws the seeds with replacement, then the items within each drawn seed, so the interval
  counts how much the seeds themselves differ. A 95% interval of the accuracy difference above
  zero means the arm beats the other, below zero that it loses, otherwise a tie at this scale.
- *After each phase*: the multi-phase arms answer the test split at every phase boundary too;
  a band that falls after a later phase is forgetting.
- *Win / tie / lose*: the paper's protocol with an offline judge in GPT-4's place: each answer
  is scored 1-10 (10 = correct, else by similarity to the reference), every pair twice with the
  order swapped; WinRate = (win + tie/2) / n - 0.5, in points, from the arm's side against
  {BASELINE} (mean +- sd over seeds; counts pooled over seeds).
- *Loss* (first seed): a phased curve jumps at each phase boundary (dashed lines), where
  harder data arrives (with a fresh learning-rate schedule and optimizer state, unless the arm
  keeps one for the run).
- The sizes were chosen so that {BASELINE} leaves headroom in every band (criteria in
  `phased_jax/demo/config.py`), never by the arms' difference. This is the method's behaviour
  at this scale, not the paper's effect size.
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


def _pm(m_sd: tuple[float, float], pct: bool = True) -> str:
    m, sd = m_sd
    if math.isnan(m):
        return "n/a"
    return f"{100 * m:.1f} ± {100 * sd:.1f}%" if pct else f"{m:+.2f} ± {sd:.2f}"


def _interval(b: Mapping[str, float]) -> str:
    if math.isnan(b["diff"]):
        return "n/a"
    return f"{100 * b['diff']:+.1f} [{100 * b['lo']:+.1f}, {100 * b['hi']:+.1f}]"


def comparisons(arms: Sequence[str]) -> list[tuple[str, str]]:
    """(arm, against) pairs, pre-registered: every arm against BASELINE, then each follow-up
    variant (`FOLLOW_UP`) against the arm it varies."""
    pairs = [(a, BASELINE) for a in arms if a != BASELINE]
    return pairs + [(a, b) for a, b in FOLLOW_UP.items() if a in arms and b in arms]


def verdict_sentence(arm: str, against: str, boot: Mapping[str, float]) -> str:
    """One sentence: does `arm` beat, tie or lose to `against`, with its interval."""
    v = stats.verdict(boot)
    word = {"beats": "beats", "loses": "loses to", "ties": "ties with"}[v]
    per_seed = boot["n"] // boot["seeds"] if boot["seeds"] else 0
    return (f"{arm} {word} {against} at this scale: exact match {100 * boot['diff']:+.1f} "
            f"points (95% interval {100 * boot['lo']:+.1f} to {100 * boot['hi']:+.1f}; "
            f"two-level bootstrap over {boot['seeds']} seeds x {per_seed} items).")


def summarise(runs: Mapping[Any, Mapping[str, Mapping[str, Any]]], test_path: Path
              ) -> dict[str, Any]:
    """Accuracy per seed and arm, mean +- sd per band, WinRate per seed vs the baseline, the
    pooled win/tie/lose counts, and for each comparison the bootstrap and its verdict."""
    seeds = list(runs)
    arms = list(runs[seeds[0]])
    acc = {a: {s: judge.accuracy(runs[s][a]["answers"], test_path) for s in seeds} for a in arms}
    mean = {a: {b: stats.mean_sd([_acc_of(acc[a][s], b) for s in seeds]) for b in SETS}
            for a in arms}
    hits = {a: {s: stats.item_hits(runs[s][a]["answers"], test_path) for s in seeds}
            for a in arms}
    winrate, pooled = {}, {}
    for a in (a for a in arms if a != BASELINE):
        per_seed = {s: judge.pairwise(runs[s][a]["answers"], runs[s][BASELINE]["answers"],
                                      test_path) for s in seeds}
        winrate[a] = {b: stats.mean_sd([per_seed[s]["by_set"][b]["winrate"] for s in seeds])
                      for b in SETS}
        pooled[a] = {b: {k: sum(per_seed[s]["by_set"][b][k] for s in seeds)
                         for k in ("win", "tie", "lose", "n")} for b in SETS}
        for b in SETS:
            c = pooled[a][b]
            c["winrate"] = (c["win"] + c["tie"] / 2) / c["n"] * 100 - 50 if c["n"] else math.nan
    boot, verdicts = {}, {}
    for a, b in comparisons(arms):
        key = f"{a} vs {b}"
        boot[key] = stats.compare(hits[a], hits[b])
        verdicts[key] = {"arm": a, "against": b, "verdict": stats.verdict(boot[key]["all"]),
                         "sentence": verdict_sentence(a, b, boot[key]["all"])}
    outside = [b for b in judge.BANDS
               if not HEADROOM[0] <= mean[BASELINE][b][0] <= HEADROOM[1]]
    return {"seeds": seeds, "arms": arms, "accuracy": acc, "mean_sd": mean,
            "headroom": {"range": list(HEADROOM), "bands_outside": outside},
            "winrate_mean_sd": winrate, "winrate_pooled": pooled, "bootstrap": boot,
            "verdicts": verdicts}


def _minus(key: str) -> str:
    return key.replace(" vs ", " - ")


def results_table(res: Mapping[str, Any]) -> str:
    """The headline table: bands x arms (mean +- sd), WinRate and the bootstrap intervals."""
    arms = res["arms"]
    rows = [[f"exact match, {a}"] + [_pm(res["mean_sd"][a][s]) for s in SETS] for a in arms]
    rows += [[f"WinRate vs {BASELINE}, {a} (points)"]
             + [_pm(res["winrate_mean_sd"][a][s], pct=False) for s in SETS]
             for a in res["winrate_mean_sd"]]
    rows += [[f"{_minus(k)}, points [95% CI]"] + [_interval(b[s]) for s in SETS]
             for k, b in res["bootstrap"].items()]
    return _table([f"{len(res['seeds'])} seeds"] + [judge.BAND_LABELS[s] for s in SETS], rows)


def seeds_table(res: Mapping[str, Any]) -> str:
    """Exact match over all items of every arm on every seed, and each comparison's
    difference per seed: the seed-to-seed spread the two-level bootstrap counts."""
    seeds, acc = res["seeds"], res["accuracy"]
    rows = [[a] + [_pct(_acc_of(acc[a][s], "all")) for s in seeds]
            + [_pm(res["mean_sd"][a]["all"])] for a in res["arms"]]
    for v in res["verdicts"].values():
        diffs = [100 * (_acc_of(acc[v["arm"]][s], "all") - _acc_of(acc[v["against"]][s], "all"))
                 for s in seeds]
        m, sd = stats.mean_sd(diffs)
        rows.append([f"{v['arm']} - {v['against']} (points)"] + [f"{d:+.1f}" for d in diffs]
                    + [f"{m:+.1f} ± {sd:.1f}"])
    return _table(["all items"] + [f"seed {s}" for s in seeds] + ["mean ± sd"], rows)


def seed_band_table(res: Mapping[str, Any]) -> str:
    """Exact match of every seed and arm in every band."""
    rows = [[s, a] + [_pct(_acc_of(res["accuracy"][a][s], b)) for b in SETS]
            for s in res["seeds"] for a in res["arms"]]
    return _table(["seed", "arm"] + [judge.BAND_LABELS[b] for b in SETS], rows)


def after_phase(phase_answers: Mapping[str, Mapping[Any, Mapping[str, str | Path]]],
                test_path: Path) -> dict[str, dict[str, dict[str, tuple[float, float]]]]:
    """arm -> "after phase k" -> band -> (mean, sd) over seeds, from
    phase_answers: arm -> seed -> "after phase k" -> answers file."""
    out: dict[str, dict[str, dict[str, tuple[float, float]]]] = {}
    for arm, by_seed in phase_answers.items():
        labels = list(next(iter(by_seed.values()), {}))
        acc = {lab: [judge.accuracy(by_seed[s][lab], test_path) for s in by_seed]
               for lab in labels}
        out[arm] = {lab: {b: stats.mean_sd([_acc_of(x, b) for x in acc[lab]]) for b in SETS}
                    for lab in labels}
    return out


def after_phase_table(after: Mapping[str, Mapping[str, Mapping[str, tuple[float, float]]]]
                      ) -> str:
    rows = [[f"{arm}, {lab}"] + [_pm(by_band[s]) for s in SETS]
            for arm, by_lab in after.items() for lab, by_band in by_lab.items()]
    return _table(["model (mean ± sd over seeds)"] + [judge.BAND_LABELS[s] for s in SETS], rows)


def headroom_note(res: Mapping[str, Any]) -> str:
    """A warning when one-off left a band outside the designed headroom (another CPU, other
    sizes): there the comparison sits at the floor or the ceiling."""
    lo, hi = res["headroom"]["range"]
    bands = ", ".join(judge.BAND_LABELS[b] for b in res["headroom"]["bands_outside"])
    return (f"note: {BASELINE} is outside the designed {100 * lo:.0f}-{100 * hi:.0f}% headroom "
            f"in {bands}; differences there are squeezed by the floor or the ceiling.")


def summary_text(res: Mapping[str, Any]) -> str:
    """What `make demo` prints last: the results table as text and the verdicts."""
    arms, width = res["arms"], 22
    labels = ([(a, a) for a in arms]
              + [(f"WinRate {a} vs {BASELINE}", a) for a in res["winrate_mean_sd"]]
              + [(f"{_minus(k)} [95% CI]", k) for k in res["bootstrap"]])
    lw = max(len(label) for label, _ in labels) + 2
    head = f"  {'':<{lw}}" + "".join(f"{judge.BAND_LABELS[s]:>{width}}" for s in SETS)
    lines = [f"== results: exact match on the held-out split, mean ± sd over "
             f"{len(res['seeds'])} seeds ==", head]
    lines += [f"  {a:<{lw}}" + "".join(f"{_pm(res['mean_sd'][a][s]):>{width}}" for s in SETS)
              for a in arms]
    lines += [f"  {'WinRate ' + a + ' vs ' + BASELINE:<{lw}}"
              + "".join(f"{_pm(w[s], pct=False):>{width}}" for s in SETS)
              for a, w in res["winrate_mean_sd"].items()]
    lines += [f"  {_minus(k) + ' [95% CI]':<{lw}}"
              + "".join(f"{_interval(b[s]):>{width}}" for s in SETS)
              for k, b in res["bootstrap"].items()]
    lines += ["", headroom_note(res)] if res["headroom"]["bands_outside"] else []
    lines += ["", *("verdict: " + v["sentence"] for v in res["verdicts"].values())]
    return "\n".join(lines)


def write_report(out_dir: str | Path, *, runs: Mapping[Any, Mapping[str, Mapping[str, Any]]],
                 test_path: str | Path, timings: Mapping[str, float],
                 extra: Mapping[str, Any] | None = None,
                 train_path: str | Path | None = None,
                 phase_answers: Mapping[str, Mapping[Any, Mapping[str, str | Path]]] | None = None,
                 base: Mapping[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """Write report.md, loss.png, accuracy.png, winrate.png, results.json, and forgetting.png
    when there are phase_answers.

    runs: seed -> arm -> {"metrics_jsonl", "phase_boundaries": [global steps], "answers"}; every
    seed has the same arms, one of them BASELINE ("oneoff"), which the others are judged
    against. timings: stage -> seconds, in order. extra: scalars shown under "Setup", all kept
    in results.json. train_path: the training data, for the phase table. phase_answers: arm ->
    seed -> "after phase k" -> answers of that arm's model at the end of its phase k (the last
    is the final model's). base: the base model's build info (its pretraining loss is plotted
    when its metrics file exists).
    Returns (report.md's path, the results: `summarise`'s dict plus "summary_text").
    """
    if not runs:
        raise ReportError("write_report needs at least one seed")
    seeds = list(runs)
    if BASELINE not in runs[seeds[0]] or len(runs[seeds[0]]) < 2:
        raise ReportError(f"write_report needs the {BASELINE!r} arm and at least one other")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    test_path = Path(test_path)
    res = summarise(runs, test_path)
    res["summary_text"] = summary_text(res)
    first = runs[seeds[0]]
    metrics = {}
    if base and Path(base.get("metrics_jsonl", "")).is_file():
        metrics["base (pretraining)"] = read_metrics(base["metrics_jsonl"])
    metrics.update({f"{a} (seed {seeds[0]})": read_metrics(r["metrics_jsonl"])
                    for a, r in first.items()})
    boundaries = {f"{a} (seed {seeds[0]})": list(r.get("phase_boundaries") or [])
                  for a, r in first.items()}
    phase_acc = after_phase(phase_answers or {}, test_path)

    plot_loss(metrics, boundaries, out / "loss.png")
    plot_accuracy(res["mean_sd"], len(seeds), out / "accuracy.png")
    if phase_acc:
        plot_forgetting(phase_acc, len(seeds), out / "forgetting.png")
    plot_winrate({f"{a} vs {BASELINE}": res["winrate_pooled"][a] for a in res["winrate_pooled"]},
                 out / "winrate.png")

    md = [_intro(res["arms"], len(seeds))]
    md += ["## Verdict", "", *(f"- {v['sentence']}" for v in res["verdicts"].values()), ""]
    if res["headroom"]["bands_outside"]:
        md += [f"- {headroom_note(res)}", ""]
    shown = {k: v for k, v in (extra or {}).items() if isinstance(v, str | int | float | bool)}
    if shown:
        md += ["## Setup", "",
               *(f"- **{k}**: {v:.4g}" if isinstance(v, float) else f"- **{k}**: {v}"
                 for k, v in shown.items()), ""]
    md += ["## Phases", "", phase_table(Path(train_path) if train_path else None, test_path), ""]
    md += ["## Results (mean ± sd over seeds)", "", "![accuracy](accuracy.png)", "",
           results_table(res), "", "## Seeds", "",
           "Exact match over all items, every seed, and each comparison's difference per seed:",
           "", seeds_table(res), "", "Every seed and band:", "", seed_band_table(res), ""]
    if phase_acc:
        md += ["## After each phase (forgetting)", "",
               "Each multi-phase arm's model at the end of its phase 1, 2 and 3 (reverse's "
               "phase 1 is the hardest data); the last is the final model.", "",
               "![after each phase](forgetting.png)", "", after_phase_table(phase_acc), ""]
    md += ["## Win / tie / lose (offline judge, both orders, pooled over seeds)", "",
           "![win tie lose](winrate.png)", ""]
    for a, cmp in res["winrate_pooled"].items():
        md += [winrate_table(cmp, f"{a} vs {BASELINE}"), ""]
    md += ["## Training loss", "", "![training loss](loss.png)", "",
           "| run | logged steps | first loss | last loss | phase boundaries (step) |",
           "|---|---|---|---|---|"]
    for n, rows in metrics.items():
        first_loss = f"{rows[0]['loss']:.3f}" if rows else "n/a"
        last_loss = f"{rows[-1]['loss']:.3f}" if rows else "n/a"
        md.append(f"| {n} | {len(rows)} | {first_loss} | {last_loss} | "
                  f"{', '.join(map(str, boundaries.get(n, []))) or '-'} |")
    md += ["", "## Timing", ""]
    md.append(_table(["stage", "seconds"],
                     [[k, f"{v:.1f}"] for k, v in timings.items()]
                     + [["**total**", f"**{sum(timings.values()):.1f}**"]]))
    md += ["", "## Files", "", f"- test set: `{test_path}`"]
    if train_path:
        md.append(f"- training data: `{train_path}`")
    if base:
        md.append(f"- base model (HF): `{base['dir']}` (key {base['key']}, "
                  f"{'reused' if base['reused'] else 'built in this run'})")
    for s in seeds:
        for a, r in runs[s].items():
            md.append(f"- seed {s}, {a}: metrics `{r['metrics_jsonl']}`, answers `{r['answers']}`")
    md.append(f"- this report and its plots: `{out}`")

    results = {**res, "accuracy_after_phase": phase_acc, "timings": dict(timings),
               "phase_boundaries": boundaries, "base": dict(base or {}),
               "extra": dict(extra or {})}
    results["accuracy"] = {a: {str(s): v for s, v in by.items()}
                           for a, by in res["accuracy"].items()}
    write_text_atomic(out / "results.json",
                      json.dumps(_no_nan(results), indent=2, default=str, allow_nan=False) + "\n")
    path = out / "report.md"
    write_text_atomic(path, "\n".join(md) + "\n")
    return path, res
