"""Do two judges agree? Item verdicts from two judgments.jsonl files, compared one by one.

Items are matched by (test_set, id, system, baseline). The verdict is the item outcome after
both orders (win/tie/lose, from the system's side); items a judge could not judge are left out
and counted. Cohen's kappa corrects the raw agreement for what two judges with the same verdict
frequencies would reach by chance: kappa = (p_o - p_e) / (1 - p_e), p_e = sum_k pA(k) pB(k).
It is undefined (None) when both judges give one and the same verdict to every item.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from phased_jax.fileio import iter_jsonl
from phased_jax.formats import InputError

VERDICTS = ("win", "tie", "lose")
Key = tuple[str, str, str, str]  # test_set, id, system, baseline


@dataclass
class JudgeFile:
    """One judge's verdicts: judged items, items it could not judge, and its model(s)."""

    verdicts: dict[Key, str] = field(default_factory=dict)
    unjudged: set[Key] = field(default_factory=set)
    models: set[str] = field(default_factory=set)


def load_judgments(path: Path) -> JudgeFile:
    """Read a judgments.jsonl; InputError naming file:line on a row that is not a judgment."""
    out = JudgeFile()
    first_line: dict[Key, int] = {}
    for line, row in iter_jsonl(path, InputError):
        try:
            key = (str(row["test_set"]), str(row["id"]), str(row["system"]), str(row["baseline"]))
            outcome = row["outcome"]
        except KeyError as e:
            raise InputError(f"{path}:{line}: no field {e.args[0]!r}; give a judgments.jsonl "
                             "written by phased-judge") from None
        if outcome is not None and outcome not in VERDICTS:
            raise InputError(f"{path}:{line}: outcome {outcome!r} is not one of win/tie/lose/null")
        if key in first_line:
            raise InputError(f"{path}:{line}: item {'/'.join(key)} already on line {first_line[key]}")
        first_line[key] = line
        if outcome is None:
            out.unjudged.add(key)
        else:
            out.verdicts[key] = outcome
        if row.get("judge_model"):
            out.models.add(str(row["judge_model"]))
    return out


def cohen_kappa(pairs: Sequence[tuple[str, str]]) -> float | None:
    """Cohen's kappa of (verdict A, verdict B) pairs; None when chance agreement is certain."""
    if not pairs:
        return None
    n = len(pairs)
    p_o = sum(a == b for a, b in pairs) / n
    ca, cb = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    p_e = sum(ca[k] * cb[k] for k in ca) / (n * n)
    return None if p_e == 1 else (p_o - p_e) / (1 - p_e)


@dataclass
class Agreement:
    """Verdict pairs of the items both judges judged, and the items that could not be compared."""

    pairs: list[tuple[str, str]]
    only_a: list[Key]
    only_b: list[Key]
    unjudged: list[Key]

    @property
    def agreement(self) -> float | None:
        return sum(a == b for a, b in self.pairs) / len(self.pairs) if self.pairs else None

    @property
    def kappa(self) -> float | None:
        return cohen_kappa(self.pairs)


def compare(a: JudgeFile, b: JudgeFile) -> Agreement:
    """Match items by key; unmatched and unjudged items are listed, not compared."""
    keys_a, keys_b = a.verdicts.keys() | a.unjudged, b.verdicts.keys() | b.unjudged
    both = [k for k in a.verdicts if k in b.verdicts]
    return Agreement(
        pairs=[(a.verdicts[k], b.verdicts[k]) for k in both],
        only_a=sorted(keys_a - keys_b),
        only_b=sorted(keys_b - keys_a),
        unjudged=sorted((keys_a & keys_b) - set(both)),
    )


def _names(keys: list[Key], limit: int = 20) -> str:
    shown = ", ".join("/".join(k[:2]) + f" ({k[2]} vs {k[3]})" for k in keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


def format_agreement(result: Agreement, paths: tuple[Path, Path], files: tuple[JudgeFile, JudgeFile]) -> str:
    """The report `phased-judge --agreement` prints."""
    lines = []
    for tag, path, f in zip("AB", paths, files, strict=True):
        lines.append(f"{tag}: {path} (judge {', '.join(sorted(f.models)) or 'not recorded'})")
    n = len(result.pairs)
    agree = sum(x == y for x, y in result.pairs)
    pct = "n/a" if result.agreement is None else f"{result.agreement:.3f}"
    kappa = "n/a (one verdict for every item)" if result.kappa is None else f"{result.kappa:.3f}"
    lines += [f"items compared: {n}", f"agreement: {pct} ({agree}/{n})",
              f"Cohen's kappa (win/tie/lose): {kappa}", "", "rows A, columns B:",
              "       " + " ".join(f"{v:>5}" for v in VERDICTS)]
    table = Counter(result.pairs)
    lines += [f"{a:>6} " + " ".join(f"{table[(a, b)]:>5}" for b in VERDICTS) for a in VERDICTS]
    for label, keys in (("only in A", result.only_a), ("only in B", result.only_b),
                        ("unjudged in A or B", result.unjudged)):
        if keys:
            lines.append(f"{label} ({len(keys)}): {_names(keys)}")
    return "\n".join(lines) + "\n"
