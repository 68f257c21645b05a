"""Mean +- sd over seeds, the two-level (seeds, then items) bootstrap and its verdict."""

import math

import numpy as np
import pytest

from phased_jax.demo import stats


def test_mean_sd_is_the_sample_sd():
    assert stats.mean_sd([0.5, 0.7, 0.9]) == pytest.approx((0.7, 0.2))
    assert stats.mean_sd([0.4]) == (0.4, 0.0)
    assert all(math.isnan(x) for x in stats.mean_sd([]))


def test_one_seed_is_the_item_level_bootstrap_and_matches_the_normal_approximation():
    # 240 pairs of +1 and 160 of 0: mean 0.6, standard error sqrt(0.6 * 0.4 / 400) = 0.0245,
    # so the 95% interval is 0.6 +- 0.048; 4000 resamples put each end within ~0.005 of it.
    b = stats.bootstrap([[1] * 240 + [0] * 160])
    half = 1.96 * math.sqrt(0.6 * 0.4 / 400)
    assert b["n"] == 400 and b["seeds"] == 1 and b["diff"] == pytest.approx(0.6)
    assert b["lo"] == pytest.approx(0.6 - half, abs=0.008)
    assert b["hi"] == pytest.approx(0.6 + half, abs=0.008)


def test_deterministic_given_its_seed():
    rng = np.random.default_rng(0)
    diffs = rng.integers(-1, 2, (5, 100)).tolist()
    assert stats.bootstrap(diffs) == stats.bootstrap(diffs)
    assert stats.bootstrap(diffs, seed=1) != stats.bootstrap(diffs)


def test_without_seed_variation_it_is_the_item_level_interval():
    # Five seeds with the very same outcomes: drawing seeds changes nothing, so resampling
    # items within them is resampling the 500 pooled pairs.
    seed_row = [1] * 30 + [-1] * 10 + [0] * 60
    two = stats.bootstrap([seed_row] * 5)
    pooled = stats.bootstrap([seed_row * 5])
    assert two["diff"] == pooled["diff"] == pytest.approx(0.2)
    assert two["lo"] == pytest.approx(pooled["lo"], abs=0.01)
    assert two["hi"] == pytest.approx(pooled["hi"], abs=0.01)


def test_between_seed_variation_widens_the_interval():
    # Seed means 0, 0.2, 0.4, 0.6, 0.8: pooled as 500 independent pairs the mean 0.4 looks
    # sure to +-0.04; over seeds its standard error is 0.32 / sqrt(5) = 0.14.
    diffs = [[1] * k + [0] * (100 - k) for k in (0, 20, 40, 60, 80)]
    two = stats.bootstrap(diffs)
    pooled = stats.bootstrap([sum(diffs, [])])
    assert two["diff"] == pooled["diff"] == pytest.approx(0.4)
    assert two["hi"] - two["lo"] > 3 * (pooled["hi"] - pooled["lo"])
    assert two["lo"] < 0.2 and two["hi"] > 0.6


def test_seeds_need_the_same_items():
    with pytest.raises(ValueError, match="same number of items"):
        stats.bootstrap([[1, 0], [1]])
    assert math.isnan(stats.bootstrap([[], []])["diff"])


@pytest.mark.parametrize("diffs,want", [
    ([1] * 30 + [0] * 70, "beats"),
    ([-1] * 30 + [0] * 70, "loses"),
    ([1] * 10 + [-1] * 10 + [0] * 80, "ties"),
])
def test_verdict_follows_the_interval(diffs, want):
    assert stats.verdict(stats.bootstrap([diffs])) == want


def test_compare_splits_seeds_and_bands():
    a = {0: {"x": ("phase1", 1), "y": ("phase3", 1)}, 1: {"x": ("phase1", 1), "y": ("phase3", 0)}}
    b = {0: {"x": ("phase1", 0), "y": ("phase3", 1)}, 1: {"x": ("phase1", 1), "y": ("phase3", 1)}}
    got = stats.compare(a, b)
    assert got["phase1"]["n"] == 2 and got["phase1"]["diff"] == 0.5
    assert got["phase1"]["seeds"] == 2
    assert got["phase3"]["diff"] == -0.5 and got["phase2"]["n"] == 0
    assert got["all"]["n"] == 4 and got["all"]["diff"] == 0.0
