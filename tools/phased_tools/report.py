"""Win-rate tables in the paper's layout: Markdown, CSV, JSON and a bar chart PNG."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from phased_jax.fileio import write_bytes_atomic, write_text_atomic
from phased_tools.bias import ALL, Bias
from phased_tools.winrate import Tally, weighted_average

Results = Mapping[str, Mapping[str, Tally]]  # system -> test set -> tally
BiasTable = Mapping[str, Mapping[str, Bias]]  # system -> test set or ALL -> bias statistics
BIAS_NOTE = (
    "Position consistency: share of items whose two orders name the same winner (a tie agrees "
    "only with a tie; 1 = blind to position). First-shown wins: share of judged orders won by "
    "the answer shown as Assistant 1 (ties are not wins; 0.5 = no position bias when the judge "
    "never ties). Lengths in characters; winner / loser: mean over items not tied. Q1-Q4: "
    "WinRate by quartile of system minus baseline answer length (Q1 = system shortest relative "
    "to the baseline), with each quartile's range; a flat row means no length effect."
)


def fmt_points(x: float | None) -> str:
    """+4.17 / -0.60 / n/a, as the paper prints WinRate."""
    return "n/a" if x is None else f"{x:+.2f}"


def fmt_share(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def fmt_chars(x: float | None) -> str:
    """A mean length with one decimal: whole characters rounded a 1.5-character gap to 2 (or 1)."""
    return "n/a" if x is None else f"{x:.1f}"


def bias_markdown(bias: BiasTable, test_sets: list[str]) -> list[str]:
    """The judge-bias section: one row per system and test set, then the pooled row."""
    lines = ["", "## Judge bias", "", BIAS_NOTE, "",
             "| system | test set | items | position consistency | first-shown wins | winner / loser chars "
             "| Q1 | Q2 | Q3 | Q4 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for system, per_set in bias.items():
        for name in [*test_sets, ALL]:
            if (b := per_set.get(name)) is None:
                continue
            quartiles = [fmt_points(q.winrate) + ("" if q.low is None else f" ({q.low:+d}..{q.high:+d})")
                         for q in b.length_quartiles]
            lines.append(f"| {system} | {name} | {b.items} | {fmt_share(b.position_consistency)} | "
                         f"{fmt_share(b.first_position_wins)} | {fmt_chars(b.winner_chars)} / "
                         f"{fmt_chars(b.loser_chars)} | " + " | ".join(quartiles) + " |")
    return lines


def to_markdown(results: Results, baseline: str, test_sets: list[str], unparseable: list[dict[str, Any]],
                bias: BiasTable | None = None, judge: str | None = None) -> str:
    """WinRate points per test set and the size-weighted average, one row per system; then the
    judge's bias statistics."""
    head = "| system | " + " | ".join(test_sets) + " | avg |"
    rule = "|---|" + "---|" * (len(test_sets) + 1)
    lines = [f"# WinRate vs {baseline} (points)", ""]
    if judge:
        lines += [f"Judge: `{judge}`", ""]
    lines += [head, rule]
    for system, per_set in results.items():
        cells = [fmt_points(per_set[t].winrate()) if t in per_set else "n/a" for t in test_sets]
        lines.append(f"| {system} | " + " | ".join(cells) + f" | {fmt_points(weighted_average(per_set))} |")
    lines += ["", "Items win / tie / lose (unparseable, not counted):", "", head, rule]
    for system, per_set in results.items():
        cells = [f"{t.win}/{t.tie}/{t.lose} ({t.unparseable})" for t in (per_set.get(s, Tally()) for s in test_sets)]
        tot = Tally(*(sum(getattr(t, f) for t in per_set.values()) for f in ("win", "tie", "lose", "unparseable")))
        lines.append(f"| {system} | " + " | ".join(cells) + f" | {tot.win}/{tot.tie}/{tot.lose} ({tot.unparseable}) |")
    lines += [
        "",
        "WinRate = (win + tie/2) / (win + tie + lose) - 0.5, x100; each pair judged in both orders; "
        "avg weighted by items judged per test set.",
    ]
    if bias:
        lines += bias_markdown(bias, test_sets)
    if unparseable:
        lines += ["", f"## Unparseable or failed judgments ({len(unparseable)} items, not counted)", ""]
        for u in unparseable[:200]:
            lines.append(f"- {u['system']} / {u['test_set']} / {u['id']}: {u['error']}")
        if len(unparseable) > 200:
            lines.append(f"- ... and {len(unparseable) - 200} more (see judgments.jsonl)")
    return "\n".join(lines) + "\n"


BIAS_COLUMNS = ["position_consistency", "first_position_wins", "winner_chars", "loser_chars",
                "length_q1_winrate", "length_q2_winrate", "length_q3_winrate", "length_q4_winrate"]


def bias_cells(b: Bias | None) -> list[str]:
    """The CSV cells of BIAS_COLUMNS ("" where there is nothing to measure)."""
    if b is None:
        return [""] * len(BIAS_COLUMNS)
    values = [b.position_consistency, b.first_position_wins, b.winner_chars, b.loser_chars,
              *(q.winrate for q in b.length_quartiles)]
    return ["" if v is None else f"{v:.4f}" for v in values]


def to_csv(results: Results, baseline: str, bias: BiasTable | None = None, judge: str | None = None) -> str:
    """One row per (system, test set) plus an `avg` row per system (its bias pooled over sets)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["system", "baseline", "test_set", "win", "tie", "lose", "unparseable", "judged", "winrate_points",
                "judge_model", *BIAS_COLUMNS])
    for system, per_set in results.items():
        sys_bias = (bias or {}).get(system, {})
        for name, t in per_set.items():
            wr = t.winrate()
            w.writerow([system, baseline, name, t.win, t.tie, t.lose, t.unparseable, t.judged,
                        "" if wr is None else f"{wr:.4f}", judge or "", *bias_cells(sys_bias.get(name))])
        avg = weighted_average(per_set)
        tot = sum(t.judged for t in per_set.values())
        unp = sum(t.unparseable for t in per_set.values())
        w.writerow([system, baseline, "avg", "", "", "", unp, tot, "" if avg is None else f"{avg:.4f}",
                    judge or "", *bias_cells(sys_bias.get(ALL))])
    return buf.getvalue()


def to_json(results: Results, baseline: str, extra: Mapping[str, Any], bias: BiasTable | None = None) -> str:
    """Tallies, WinRates and (under each system's "bias") the judge's bias statistics."""
    out = {
        "baseline": baseline,
        "systems": {
            system: {"test_sets": {n: t.as_dict() for n, t in per_set.items()}, "avg": weighted_average(per_set),
                     **({"bias": {n: b.as_dict() for n, b in bias[system].items()}}
                        if bias and system in bias else {})}
            for system, per_set in results.items()
        },
        **extra,
    }
    return json.dumps(out, indent=2, ensure_ascii=False) + "\n"


def to_png(results: Results, baseline: str, test_sets: list[str], path: Path) -> bool:
    """Grouped bars (test sets + avg, one bar per system); False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cols = test_sets + ["avg"]
    systems = list(results)
    width = 0.8 / max(1, len(systems))
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2, 4))
    for i, system in enumerate(systems):
        per_set = results[system]
        vals = [(per_set[t].winrate() if t in per_set else None) for t in test_sets]
        vals.append(weighted_average(per_set))
        xs = [j + (i - (len(systems) - 1) / 2) * width for j in range(len(cols))]
        bars = ax.bar(xs, [v or 0.0 for v in vals], width, label=system)
        for b, v in zip(bars, vals, strict=True):
            ax.annotate(fmt_points(v), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                        va="bottom" if (v or 0) >= 0 else "top", fontsize=7)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylabel("WinRate (points)")
    ax.set_title(f"WinRate vs {baseline}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return True


def write_all(outdir: Path, results: Results, baseline: str, test_sets: list[str],
              unparseable: list[dict[str, Any]], extra: Mapping[str, Any], bias: BiasTable | None = None,
              judge: str | None = None) -> list[Path]:
    """Write winrate.{md,csv,json,png}, each naming the `judge` model; returns the paths written."""
    outdir.mkdir(parents=True, exist_ok=True)
    paths = [outdir / "winrate.md", outdir / "winrate.csv", outdir / "winrate.json"]
    write_text_atomic(paths[0], to_markdown(results, baseline, test_sets, unparseable, bias, judge))
    write_text_atomic(paths[1], to_csv(results, baseline, bias, judge))
    write_text_atomic(paths[2], to_json(results, baseline, {**extra, "unparseable": unparseable}, bias))
    if to_png(results, baseline, test_sets, outdir / "winrate.png"):
        paths.append(outdir / "winrate.png")
    return paths
