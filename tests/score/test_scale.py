"""The raw -> 1-5 map and the threshold suggestion of `phased-jax stats`, on constructed scores."""

import numpy as np
import pytest

from phased_jax.data.stats import score_summary
from phased_jax.score.scale import PAPER_SHARES, quantiles, suggest_thresholds, to_scores


def test_maps_are_monotone_ties_equal_and_in_range():
    raw = np.random.default_rng(0).gamma(2.0, size=500)
    raw[:10] = raw[10]  # ties
    for mapping in ("paper", "linear"):
        s = to_scores(raw, mapping)
        assert s.min() >= 1.0 and s.max() <= 5.0
        assert np.all(np.diff(s[np.argsort(raw, kind="stable")]) >= 0)
        assert len(set(s[:11].tolist())) == 1
    assert to_scores([0.7]).tolist() == to_scores([0.7], "paper").tolist()
    assert quantiles([3.0, 1.0, 2.0]).tolist() == pytest.approx([5 / 6, 1 / 6, 3 / 6])


def test_paper_map_gives_the_paper_shares_at_the_default_thresholds():
    s = to_scores(np.arange(10_000.0), "paper")
    shares = [np.mean(s < 1.5), np.mean((s >= 1.5) & (s < 3.5)), np.mean(s >= 3.5)]
    assert shares == pytest.approx(PAPER_SHARES, abs=1e-3)
    thresholds, got = suggest_thresholds(s)
    assert thresholds == pytest.approx((1.5, 3.5), abs=1e-3)
    assert got == pytest.approx(PAPER_SHARES, abs=1e-3)


def test_suggestion_for_any_scorer():
    # GPT-4-like scores in steps: ties cannot be split, the shares achieved are reported.
    scores = [1.0] * 500 + [2.0] * 200 + [3.0] * 150 + [4.0] * 100 + [5.0] * 50
    thresholds, got = suggest_thresholds(scores)
    assert thresholds == (2.0, 4.0)
    assert got == (0.5, 0.35, 0.15)
    # Continuous uniform scores: the cut points are the paper's cumulative shares.
    u = np.linspace(1, 5, 1001)
    (t1, t2), got = suggest_thresholds(u)
    assert t1 == pytest.approx(1 + 4 * PAPER_SHARES[0], abs=0.01)
    assert got == pytest.approx(PAPER_SHARES, abs=0.002)
    text = score_summary(scores)
    assert "[1.00, 1.50)      500" in text and "[4.50, 5.00]       50" in text
    assert ("--config.data.thresholds='(2, 4)' gives 50.0%/35.0%/15.0%" in text
            and "(58%/28%/13% by count)" in text)
    assert suggest_thresholds([]) == ((), ())
