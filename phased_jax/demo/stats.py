"""Across seeds: mean +- sd per band, and a two-level bootstrap that says beats, ties or loses.

One seed's gap between two arms mixes the method's effect with the luck of the example order.
The demo trains every arm on several seeds (same data, same base): an item of seed s answered
by both arms is one pair. Pooling all pairs as independent would ignore that the seeds
themselves vary, so the bootstrap resamples seeds, then items within each seed; its 95%
interval of the accuracy difference decides the verdict: above zero beats, below zero loses,
otherwise ties (no difference detectable at this scale).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from phased_jax.demo import judge

BOOTSTRAP_SAMPLES = 4000
CONFIDENCE = 0.95


def item_hits(answers_path: str | Path, test_path: str | Path) -> dict[str, tuple[str, int]]:
    """id -> (difficulty band, 1 if the answer is an exact match else 0)."""
    refs = judge.read_by_id(test_path)
    answers = judge.match_answers(answers_path, refs, test_path)
    return {k: (judge.band_of(float(r["score"])),
                int(judge.is_correct(str(answers[k]["output"]), str(r["output"]))))
            for k, r in refs.items()}


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value; NaN for none)."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def bootstrap(diffs_by_seed: Sequence[Sequence[float]], samples: int = BOOTSTRAP_SAMPLES,
              seed: int = 0) -> dict[str, float]:
    """Two-level bootstrap of the mean paired difference: each resample draws the seeds with
    replacement, then, within each drawn seed, its items with replacement; the statistic is
    the mean difference over the drawn (seed, item) pairs. The percentile interval
    (CONFIDENCE) thus counts seed-to-seed variation (the luck of the example order), which
    treating every (seed, item) pair as independent would hide. A difference is one item of
    one seed answered by both arms, so both arms share the drawn items (paired).

    Every seed needs the same number of items (the demo's seeds share the test split). One
    "seed" holding all pairs is the plain item-level paired bootstrap.
    Returns {"n" (pairs), "seeds", "diff", "lo", "hi"} (fractions; NaN when no pairs).
    """
    lengths = {len(row) for row in diffs_by_seed}
    if len(lengths) > 1:
        raise ValueError(f"bootstrap needs the same number of items for every seed, got "
                         f"{sorted(lengths)}")
    n_seeds, n_items = len(diffs_by_seed), lengths.pop() if lengths else 0
    d = np.asarray(diffs_by_seed, dtype=np.float64).reshape(n_seeds, n_items)
    if d.size == 0:
        return {"n": 0, "seeds": n_seeds, "diff": math.nan, "lo": math.nan, "hi": math.nan}
    # Drawing n items of a seed with replacement only matters through how often each distinct
    # value (here -1, 0, +1) comes up: multinomial counts, the same distribution, far faster.
    values, inverse = np.unique(d, return_inverse=True)
    probs = np.stack([np.bincount(row, minlength=len(values)) / n_items
                      for row in inverse.reshape(d.shape)])
    rng = np.random.default_rng(seed)
    drawn = probs[rng.integers(0, n_seeds, (samples, n_seeds))]  # [samples, seeds, values]
    means = (rng.multinomial(n_items, drawn) @ values).sum(axis=1) / d.size
    tail = 100 * (1 - CONFIDENCE) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return {"n": int(d.size), "seeds": n_seeds, "diff": float(d.mean()), "lo": float(lo),
            "hi": float(hi)}


def verdict(interval: Mapping[str, float]) -> str:
    """"beats", "loses" or "ties" from a bootstrap interval of (candidate - baseline)."""
    if interval["lo"] > 0:
        return "beats"
    if interval["hi"] < 0:
        return "loses"
    return "ties"


def compare(hits_a: Mapping[Any, Mapping[str, tuple[str, int]]],
            hits_b: Mapping[Any, Mapping[str, tuple[str, int]]]) -> dict[str, dict[str, float]]:
    """Two-level bootstrap of accuracy(a) - accuracy(b) per band and over all items:
    `hits_x[seed][id] = (band, hit)`. Returns set -> {"n", "seeds", "diff", "lo", "hi"}."""
    diffs: dict[str, list[list[int]]] = {b: [] for b in (*judge.BANDS, "all")}
    for seed in sorted(hits_a):
        for rows in diffs.values():
            rows.append([])
        for key, (band, hit) in sorted(hits_a[seed].items()):
            d = hit - hits_b[seed][key][1]
            diffs[band][-1].append(d)
            diffs["all"][-1].append(d)
    return {s: bootstrap(d, seed=i) for i, (s, d) in enumerate(diffs.items())}
