"""The loader: deterministic, exactly-once per epoch, disjoint host slices, exact resume."""

import numpy as np
import pytest

from phased_jax.data.loader import PhaseLoader
from phased_jax.data.tokens import tokenize
from phased_jax.errors import DataError
from tests.data.conftest import make_records


@pytest.fixture(scope="module")
def examples(tokenizer):
    ex, _ = tokenize(make_records(50, seed=1), "authors", tokenizer, 128)
    return ex


def seen_ids(loader, steps):
    """Example indices in the global batch at each step."""
    return [[int(i) for r in loader.rows(s) if r is not None for i in r] for s in steps]


@pytest.mark.parametrize("packing", [False, True])
def test_exactly_once_per_epoch_with_padded_last_batch(examples, packing):
    ld = PhaseLoader(examples, 8, epochs=2, seed=3, phase_index=0, packing=packing)
    per_epoch = {}
    for s in range(ld.steps):
        e, _ = ld.locate(s)
        per_epoch.setdefault(e, []).extend(seen_ids(ld, [s])[0])
    assert sorted(per_epoch[0]) == sorted(per_epoch[1]) == list(range(50))
    assert per_epoch[0] != per_epoch[1]  # a different order each epoch
    if not packing:
        assert ld.steps == 2 * 7  # ceil(50 / 8) per epoch: the partial batch is padded, not dropped
        last = ld.batch(6)
        assert last["input_ids"].shape == (8, 128)
        assert last["loss_mask"][2:].sum() == 0 and (last["segment_ids"][2:] == 0).all()
    total_loss_tokens = sum(int(ld.batch(s)["loss_mask"].sum()) for s in range(ld.steps))
    assert total_loss_tokens == 2 * int(examples.trained_counts.sum())


def test_deterministic_and_seeded(examples):
    a = PhaseLoader(examples, 8, 1, seed=3, phase_index=0)
    b = PhaseLoader(examples, 8, 1, seed=3, phase_index=0)
    c = PhaseLoader(examples, 8, 1, seed=4, phase_index=0)
    d = PhaseLoader(examples, 8, 1, seed=3, phase_index=1)
    for s in range(a.steps):
        for k, v in a.batch(s).items():
            np.testing.assert_array_equal(v, b.batch(s)[k])
    assert seen_ids(a, [0]) != seen_ids(c, [0]) and seen_ids(a, [0]) != seen_ids(d, [0])
    no_shuffle = PhaseLoader(examples, 8, 1, seed=3, phase_index=0, shuffle=False)
    assert seen_ids(no_shuffle, [0]) == [list(range(8))]


@pytest.mark.parametrize("packing", [False, True])
def test_host_slices_disjoint_and_cover(examples, packing):
    whole = PhaseLoader(examples, 8, 1, seed=3, phase_index=2, packing=packing)
    hosts = [PhaseLoader(examples, 8, 1, seed=3, phase_index=2, process_index=p,
                         process_count=4, packing=packing) for p in range(4)]
    assert all(h.steps == whole.steps for h in hosts)
    for s in range(whole.steps):
        parts = [h.batch(s) for h in hosts]
        assert all(p["input_ids"].shape == (2, 128) for p in parts)
        full = whole.batch(s)
        for k in full:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])
        ids = [i for h in hosts for r in h.rows(s) if r is not None for i in r.tolist()]
        assert len(ids) == len(set(ids))


def test_resume_matches_run_through(examples):
    ld = PhaseLoader(examples, 8, 2, seed=3, phase_index=1, packing=True)
    run = [ld.batch(s) for s in range(ld.steps)]
    state = ld.state_dict(5)
    again = PhaseLoader(examples, 8, 2, seed=3, phase_index=1, packing=True)
    start = again.start_step(state)
    assert start == 5
    for s in range(start, again.steps):
        b = again.batch(s)
        for k in b:
            np.testing.assert_array_equal(b[k], run[s][k])
    other = PhaseLoader(examples.select(examples.record_ids[:40]), 8, 2, 3, 1)
    with pytest.raises(DataError, match="num_examples"):
        other.start_step(state)


def test_max_steps_and_empty_phase(examples):
    assert PhaseLoader(examples, 8, 2, 3, 0, max_steps=3).steps == 3
    assert PhaseLoader(examples.select([]), 8, 2, 3, 0).steps == 0

