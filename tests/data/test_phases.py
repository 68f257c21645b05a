"""Stratification by thresholds and quantiles, and every form of data.order."""

import pytest

from phased_jax.data.phases import NAMED_ORDERS, build_phases, check_order, parse_order, stratify
from phased_jax.data.records import Record
from phased_jax.errors import ConfigError, DataError
from tests.data.conftest import make_records


def recs(*scores):
    return [Record(str(i), "i", "", "o", s, f"f:{i}") for i, s in enumerate(scores)]


def test_paper_thresholds_bounds():
    stages = stratify(recs(1.0, 1.49, 1.5, 3.49, 3.5, 5.0))
    assert [[r.score for r in s] for s in stages] == [[1.0, 1.49], [1.5, 3.49], [3.5, 5.0]]


def test_quantiles_equal_sizes_in_score_order():
    rs = make_records(100)
    stages = stratify(rs, quantiles=4)
    assert [len(s) for s in stages] == [25] * 4
    assert all(max(r.score for r in a) <= min(r.score for r in b)
               for a, b in zip(stages, stages[1:], strict=False))


def test_bad_thresholds_and_unscored():
    with pytest.raises(ConfigError, match="increase"):
        stratify(recs(2.0), thresholds=(3.5, 1.5))
    with pytest.raises(DataError, match="no score.*oneoff"):
        build_phases(recs(None, 2.0))
    assert build_phases(recs(None, None), "oneoff")[0].size == 2  # plain Alpaca trains one-off


@pytest.mark.parametrize("order,expect", [
    ("1,2,3", [(1,), (2,), (3,)]), ("2,1,3", [(2,), (1,), (3,)]), ("3", [(3,)]),
    ("1", [(1,)]), ("1,2", [(1,), (2,)]), ("1+3", [(1, 3)]), ("1+2,3", [(1, 2), (3,)]),
    (" 2 , 3 ", [(2,), (3,)]),
])
def test_parse_order(order, expect):
    assert parse_order(order, 3) == expect


@pytest.mark.parametrize("order", ["1,4", "1,1", "a", "1++2", ""])
def test_bad_orders(order):
    with pytest.raises(ConfigError, match="data.order"):
        parse_order(order, 3)
    with pytest.raises(ConfigError, match="data.order"):
        check_order(order, 3)


def test_named_orders_are_valid_and_built_by_build_phases():
    for order in NAMED_ORDERS:
        check_order(order, 3)  # no error
    assert [p.stages for p in build_phases(recs(1.0, 2.0, 4.0), "random")] == [(1,), (2,), (3,)]


def test_phases_follow_order_and_mix():
    rs = make_records(200)
    s1, s2, s3 = stratify(rs)
    ph = build_phases(rs, "2,1,3")
    assert [p.name for p in ph] == ["2", "1", "3"]
    assert [p.records for p in ph] == [tuple(s2), tuple(s1), tuple(s3)]
    (mixed,) = build_phases(rs, "1+3")
    assert set(mixed.records) == set(s1) | set(s3) and mixed.size == len(s1) + len(s3)
    one = build_phases(rs, "oneoff")
    assert len(one) == 1 and one[0].size == 200
    assert [p.size for p in build_phases(rs, "1+2,3")] == [len(s1) + len(s2), len(s3)]


def test_random_stages_seeded_same_sizes():
    rs = make_records(300)
    sizes = [len(s) for s in stratify(rs)]
    a, b, c = (build_phases(rs, "random", seed=s) for s in (1, 1, 2))
    assert [p.size for p in a] == sizes
    assert a == b and a != c
    assert sorted(r.id for p in a for r in p.records) == sorted(r.id for r in rs)
    # not just the score stages again: the easiest random stage holds harder records
    assert max(r.score for r in a[0].records) >= 3.5
