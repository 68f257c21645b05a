"""The judge's biases, measured from its own judgments (pure functions, no I/O).

A WinRate means little if the judge prefers whatever is shown first, or whatever is longer
(FastChat and AlpacaEval report both). Measured per item judged in both orders, from the rows
of judgments.jsonl; items unparseable in either order are left out, as from the WinRate.

- Position consistency: the share of items whose two orders name the same winner (the system,
  the baseline, or a tie: a tie agrees only with a tie). A judge that always prefers Assistant 1
  scores 0; a judge blind to position scores 1.
- First-position wins: over every judged order (2 per item), the share in which the answer shown
  as Assistant 1 scored higher. Ties count as not a first-position win, so an unbiased judge
  that never ties gives 0.5, and one that always prefers Assistant 1 gives 1.
- Length: answer lengths in characters. Mean length of the winner and of the loser over items
  whose outcome (both orders combined) is not a tie; and the WinRate within each quartile of the
  length difference (system minus baseline), the items split by rank into 4 near-equal groups.
  A length-neutral judge shows a flat WinRate across the quartiles.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from phased_tools.winrate import Outcome, combine, judgment_outcome, tally

ALL = "all"  # the key of the statistics pooled over test sets


@dataclass(frozen=True)
class JudgedPair:
    """One item judged in both orders, each outcome from the system's side."""

    test_set: str
    system_first: Outcome  # the system shown as Assistant 1
    baseline_first: Outcome  # the system shown as Assistant 2
    system_chars: int
    baseline_chars: int

    @property
    def outcome(self) -> Outcome:
        return combine(self.system_first, self.baseline_first)


@dataclass(frozen=True)
class Quartile:
    """WinRate (points) of the items in one quartile of system minus baseline length."""

    low: int | None
    high: int | None
    items: int
    winrate: float | None


@dataclass(frozen=True)
class Bias:
    """The bias statistics of one set of judged pairs (None where there is nothing to measure)."""

    items: int
    position_consistency: float | None
    first_position_wins: float | None
    winner_chars: float | None
    loser_chars: float | None
    length_quartiles: tuple[Quartile, ...]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def judged_pair(row: Mapping[str, Any]) -> JudgedPair | None:
    """The pair recorded in one judgments.jsonl row, or None when an order has no scores."""
    orders = row.get("system_first") or {}, row.get("baseline_first") or {}
    if any("system_score" not in o for o in orders):
        return None
    o1, o2 = (judgment_outcome(o["system_score"], o["baseline_score"]) for o in orders)
    return JudgedPair(str(row["test_set"]), o1, o2, int(row.get("system_chars") or 0),
                      int(row.get("baseline_chars") or 0))


def position_consistency(pairs: Sequence[JudgedPair]) -> float | None:
    """Share of items whose two orders agree on the winner (tie only with tie)."""
    return sum(p.system_first == p.baseline_first for p in pairs) / len(pairs) if pairs else None


def first_position_wins(pairs: Sequence[JudgedPair]) -> float | None:
    """Share of judged orders won by the answer shown first (ties are not wins)."""
    if not pairs:
        return None
    wins = sum((p.system_first == "win") + (p.baseline_first == "lose") for p in pairs)
    return wins / (2 * len(pairs))


def winner_loser_chars(pairs: Sequence[JudgedPair]) -> tuple[float | None, float | None]:
    """Mean length in characters of the winning and of the losing answer, ties left out."""
    decided = [p for p in pairs if p.outcome != "tie"]
    if not decided:
        return None, None
    win = [p.system_chars if p.outcome == "win" else p.baseline_chars for p in decided]
    lose = [p.baseline_chars if p.outcome == "win" else p.system_chars for p in decided]
    return sum(win) / len(win), sum(lose) / len(lose)


def length_quartiles(pairs: Sequence[JudgedPair]) -> tuple[Quartile, ...]:
    """WinRate per quartile (by rank) of system minus baseline length, shortest first."""
    ranked = sorted(pairs, key=lambda p: p.system_chars - p.baseline_chars)
    n = len(ranked)
    out = []
    for k in range(4):
        group = ranked[k * n // 4:(k + 1) * n // 4]
        diffs = [p.system_chars - p.baseline_chars for p in group]
        out.append(Quartile(min(diffs, default=None), max(diffs, default=None), len(group),
                            tally(p.outcome for p in group).winrate()))
    return tuple(out)


def bias(pairs: Sequence[JudgedPair]) -> Bias:
    """Every statistic for one set of pairs."""
    winner, loser = winner_loser_chars(pairs)
    return Bias(len(pairs), position_consistency(pairs), first_position_wins(pairs), winner, loser,
                length_quartiles(pairs))


def bias_by_system(rows: Iterable[Mapping[str, Any]], test_sets: Sequence[str]) -> dict[str, dict[str, Bias]]:
    """system -> test set (and ALL, pooled) -> Bias, from judgments.jsonl rows."""
    pairs: dict[str, list[JudgedPair]] = {}
    for row in rows:
        pair = judged_pair(row)
        group = pairs.setdefault(str(row["system"]), [])
        if pair is not None:
            group.append(pair)
    return {
        system: {**{t: bias([p for p in ps if p.test_set == t]) for t in test_sets}, ALL: bias(ps)}
        for system, ps in pairs.items()
    }
