"""Mean +- sd over seeds, the paired bootstrap and its verdict."""

import math

import pytest

from phased_jax.demo import stats


def test_mean_sd_is_the_sample_sd():
    assert stats.mean_sd([0.5, 0.7, 0.9]) == pytest.approx((0.7, 0.2))
    assert stats.mean_sd([0.4]) == (0.4, 0.0)
    assert all(math.isnan(x) for x in stats.mean_sd([]))


def test_bootstrap_interval_matches_the_normal_approximation():
    # 240 pairs of +1 and 160 of 0: mean 0.6, standard error sqrt(0.6 * 0.4 / 400) = 0.0245,
    # so the 95% interval is 0.6 +- 0.048; 4000 resamples put each end within ~0.005 of it.
    b = stats.paired_bootstrap([1] * 240 + [0] * 160)
    half = 1.96 * math.sqrt(0.6 * 0.4 / 400)
    assert b["n"] == 400 and b["diff"] == pytest.approx(0.6)
    assert b["lo"] == pytest.approx(0.6 - half, abs=0.008)
    assert b["hi"] == pytest.approx(0.6 + half, abs=0.008)
    assert stats.paired_bootstrap([1] * 240 + [0] * 160) == b  # seeded: the same every run


@pytest.mark.parametrize("diffs,want", [
    ([1] * 30 + [0] * 70, "beats"),
    ([-1] * 30 + [0] * 70, "loses"),
    ([1] * 10 + [-1] * 10 + [0] * 80, "ties"),
])
def test_verdict_follows_the_interval(diffs, want):
    assert stats.verdict(stats.paired_bootstrap(diffs)) == want


def test_compare_pools_seeds_and_splits_bands():
    a = {0: {"x": ("phase1", 1), "y": ("phase3", 1)}, 1: {"x": ("phase1", 1), "y": ("phase3", 0)}}
    b = {0: {"x": ("phase1", 0), "y": ("phase3", 1)}, 1: {"x": ("phase1", 1), "y": ("phase3", 1)}}
    got = stats.compare(a, b)
    assert got["phase1"]["n"] == 2 and got["phase1"]["diff"] == 0.5
    assert got["phase3"]["diff"] == -0.5 and got["phase2"]["n"] == 0
    assert got["all"]["n"] == 4 and got["all"]["diff"] == 0.0
