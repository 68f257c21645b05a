"""Win-rate tables in the paper's layout: Markdown, CSV, JSON and a bar chart PNG."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from phased_jax.fileio import write_bytes_atomic, write_text_atomic
from phased_tools.winrate import Tally, weighted_average

Results = Mapping[str, Mapping[str, Tally]]  # system -> test set -> tally


def fmt_points(x: float | None) -> str:
    """+4.17 / -0.60 / n/a, as the paper prints WinRate."""
    return "n/a" if x is None else f"{x:+.2f}"


def to_markdown(results: Results, baseline: str, test_sets: list[str], unparseable: list[dict[str, Any]]) -> str:
    """WinRate points per test set and the size-weighted average, one row per system."""
    head = "| system | " + " | ".join(test_sets) + " | avg |"
    rule = "|---|" + "---|" * (len(test_sets) + 1)
    lines = [f"# WinRate vs {baseline} (points)", "", head, rule]
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
    if unparseable:
        lines += ["", f"## Unparseable or failed judgments ({len(unparseable)} items, not counted)", ""]
        for u in unparseable[:200]:
            lines.append(f"- {u['system']} / {u['test_set']} / {u['id']}: {u['error']}")
        if len(unparseable) > 200:
            lines.append(f"- ... and {len(unparseable) - 200} more (see judgments.jsonl)")
    return "\n".join(lines) + "\n"


def to_csv(results: Results, baseline: str) -> str:
    """One row per (system, test set) plus an `avg` row per system."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["system", "baseline", "test_set", "win", "tie", "lose", "unparseable", "judged", "winrate_points"])
    for system, per_set in results.items():
        for name, t in per_set.items():
            wr = t.winrate()
            w.writerow([system, baseline, name, t.win, t.tie, t.lose, t.unparseable, t.judged, "" if wr is None else f"{wr:.4f}"])
        avg = weighted_average(per_set)
        tot = sum(t.judged for t in per_set.values())
        unp = sum(t.unparseable for t in per_set.values())
        w.writerow([system, baseline, "avg", "", "", "", unp, tot, "" if avg is None else f"{avg:.4f}"])
    return buf.getvalue()


def to_json(results: Results, baseline: str, extra: Mapping[str, Any]) -> str:
    out = {
        "baseline": baseline,
        "systems": {
            system: {"test_sets": {n: t.as_dict() for n, t in per_set.items()}, "avg": weighted_average(per_set)}
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
              unparseable: list[dict[str, Any]], extra: Mapping[str, Any]) -> list[Path]:
    """Write winrate.{md,csv,json,png}; returns the paths written."""
    outdir.mkdir(parents=True, exist_ok=True)
    paths = [outdir / "winrate.md", outdir / "winrate.csv", outdir / "winrate.json"]
    write_text_atomic(paths[0], to_markdown(results, baseline, test_sets, unparseable))
    write_text_atomic(paths[1], to_csv(results, baseline))
    write_text_atomic(paths[2], to_json(results, baseline, {**extra, "unparseable": unparseable}))
    if to_png(results, baseline, test_sets, outdir / "winrate.png"):
        paths.append(outdir / "winrate.png")
    return paths
