"""Raw difficulty (a loss, an IFD) -> the 1-5 scale, and thresholds for the paper's proportions.

A loss or an IFD has no fixed range, so the map is by rank: a raw value's quantile
`q = (rank + 0.5) / N` (rank from 0 = easiest; tied values share their mean rank) goes to 1-5 by
- `paper` (the default): piecewise linear through the paper's stage edges, q in
  [0, 0.585) -> [1, 1.5), [0.585, 0.869) -> [1.5, 3.5), [0.869, 1] -> [3.5, 5], where 0.585 and
  0.869 are the cumulative shares of the paper's Table 1 stages (30.3K / 14.7K / 6.8K of Alpaca
  52K). So the default `data.thresholds=(1.5, 3.5)` splits the data as the paper did.
- `linear`: 1 + 4q.
Both are monotone: a higher raw value (harder) never gets a lower score. JAX-free.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Paper Table 1, Alpaca 52K stage sizes (thousands): stage 1 [1,1.5), 2 [1.5,3.5), 3 [3.5,5].
PAPER_STAGE_SIZES = (30.3, 14.7, 6.8)
PAPER_SHARES = tuple(s / sum(PAPER_STAGE_SIZES) for s in PAPER_STAGE_SIZES)
PAPER_EDGES = (1.0, 1.5, 3.5, 5.0)
MAPS = ("paper", "linear")


def quantiles(raw: Sequence[float]) -> np.ndarray:
    """Each value's mid-rank quantile in (0, 1); equal values get equal quantiles."""
    x = np.asarray(raw, np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse = np.unique(x, return_inverse=True)
    mean_rank = np.bincount(inverse, ranks) / np.bincount(inverse)
    return (mean_rank[inverse] + 0.5) / max(len(x), 1)


def to_scores(raw: Sequence[float], mapping: str = "paper") -> np.ndarray:
    """Scores in [1, 5] for `raw` (higher raw = harder = higher score); see the module docstring."""
    q = quantiles(raw)
    if mapping == "linear":
        return 1.0 + 4.0 * q
    if mapping == "paper":
        cum = np.concatenate([[0.0], np.cumsum(PAPER_SHARES)])
        cum[-1] = 1.0
        return np.interp(q, cum, PAPER_EDGES)
    raise ValueError(f"unknown score map {mapping!r}; choose one of {MAPS}")


def suggest_thresholds(scores: Sequence[float], shares: Sequence[float] = PAPER_SHARES
                       ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(thresholds, the shares they give): stage k = scores in [t_{k-1}, t_k), as training
    stratifies, with each threshold the score at the cumulative share's position in sorted
    order. Ties cannot be split, so the shares achieved are reported beside them."""
    s = np.sort(np.asarray(scores, np.float64))
    n = len(s)
    if not n:
        return (), ()
    cuts = np.cumsum(shares)[:-1] / sum(shares)
    thresholds = tuple(float(s[min(int(round(c * n)), n - 1)]) for c in cuts)
    below = [int(np.searchsorted(s, t, side="left")) for t in thresholds]
    counts = np.diff([0, *below, n])
    return thresholds, tuple(float(c) / n for c in counts)


def histogram(scores: Sequence[float], width: float = 0.5, bar: int = 40) -> list[str]:
    """Text histogram of scores over [1, 5] in bins of `width` (the top bin includes 5)."""
    s = np.asarray(scores, np.float64)
    edges = np.arange(1.0, 5.0 + width / 2, width)
    counts, _ = np.histogram(s, bins=edges)
    top = max(int(counts.max()), 1) if len(counts) else 1
    lines = []
    for k, c in enumerate(counts):
        close = "]" if k == len(counts) - 1 else ")"
        lines.append(f"[{edges[k]:.2f}, {edges[k + 1]:.2f}{close} {int(c):>8,} "
                     + "#" * round(bar * int(c) / top))
    return lines
