"""Across seeds: mean +- sd per band, and a paired bootstrap that says beats, ties or loses.

One seed's gap between two arms mixes the method's effect with the luck of the example order.
The demo trains every arm on several seeds (same data, same base) and pools the per-item
outcomes: an item of seed s answered by both arms is one pair. The paired bootstrap resamples
those pairs; its 95% interval of the accuracy difference decides the verdict: above zero
beats, below zero loses, otherwise ties (no difference detectable at this scale).
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


def paired_bootstrap(diffs: Sequence[int], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
                     ) -> dict[str, float]:
    """Mean of the paired differences and its percentile interval (CONFIDENCE) by bootstrap.

    Returns {"n", "diff", "lo", "hi"} (accuracy points as fractions; NaN when no pairs).
    """
    n = len(diffs)
    if n == 0:
        return {"n": 0, "diff": float("nan"), "lo": float("nan"), "hi": float("nan")}
    d = np.asarray(diffs, dtype=np.float64)
    means = d[np.random.default_rng(seed).integers(0, n, (samples, n))].mean(axis=1)
    tail = 100 * (1 - CONFIDENCE) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return {"n": n, "diff": float(d.mean()), "lo": float(lo), "hi": float(hi)}


def verdict(interval: Mapping[str, float]) -> str:
    """"beats", "loses" or "ties" from a bootstrap interval of (candidate - baseline)."""
    if interval["lo"] > 0:
        return "beats"
    if interval["hi"] < 0:
        return "loses"
    return "ties"


def compare(hits_a: Mapping[Any, Mapping[str, tuple[str, int]]],
            hits_b: Mapping[Any, Mapping[str, tuple[str, int]]]) -> dict[str, dict[str, float]]:
    """Paired bootstrap of accuracy(a) - accuracy(b) per band and over all items, pooling
    seeds: `hits_x[seed][id] = (band, hit)`. Returns set -> {"n", "diff", "lo", "hi"}."""
    diffs: dict[str, list[int]] = {b: [] for b in (*judge.BANDS, "all")}
    for seed in sorted(hits_a):
        for key, (band, hit) in sorted(hits_a[seed].items()):
            d = hit - hits_b[seed][key][1]
            diffs[band].append(d)
            diffs["all"].append(d)
    return {s: paired_bootstrap(d, seed=i) for i, (s, d) in enumerate(diffs.items())}
