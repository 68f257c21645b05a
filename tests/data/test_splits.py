"""Held-out records per stage (the forgetting matrix's items) and replay draws."""

from __future__ import annotations

import json

import pytest

from phased_jax.config import get_default_config
from phased_jax.data.phases import build_phases
from phased_jax.data.splits import draw_replay, make_splits
from phased_jax.data.stats import main as stats_main
from tests.data.conftest import make_records, prepare_config, write_jsonl

ORDERS = ("1,2,3", "oneoff", "3,2,1", "random", "1+3,2", "2,1,3")


def config(tmp_path, path, order="1,2,3", **data):
    c = get_default_config()
    c.output_dir = str(tmp_path / "run")
    c.data.paths = (str(path),)
    c.data.order = order
    c.data.max_length = 64
    c.train.global_batch = 4
    for k, v in data.items():
        c.data[k] = v
    return c


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    recs = make_records(300, seed=3)
    rows = [{"id": r.id, "instruction": r.instruction, "input": r.input, "output": r.output,
             "score": r.score} for r in recs]
    return write_jsonl(tmp_path_factory.mktemp("splits") / "d.jsonl", rows)


def test_held_out_ids_are_the_same_for_every_order(tmp_path, data_file, tokenizer):
    held = {}
    for order in ORDERS:
        c = config(tmp_path / order.replace(",", "_"), data_file, order, eval_fraction=0.1,
                   replay=0.0 if order == "oneoff" else 0.5)
        prep = prepare_config(c, tokenizer)
        stages = {s.stage.name: sorted(s.examples.record_ids.tolist()) for s in prep.stage_evals}
        held[order] = stages
        trained = [set(p.examples.record_ids.tolist()) for p in prep.phases]
        ids = {i for v in stages.values() for i in v}
        assert ids and all(not (t & ids) for t in trained), order  # training and replay alike
        report = json.loads((tmp_path / order.replace(",", "_") / "run" / "data_report.json")
                            .read_text())
        assert {s["stage"]: s["ids"] for s in report["heldout"]["stages"]} == {
            k: sorted(v) for k, v in stages.items()}, order  # tokenisation skipped none here
    first = held[ORDERS[0]]
    assert sorted(first) == ["1", "2", "3"]
    assert all(held[o] == first for o in ORDERS), "one held-out split whatever the order"
    # round(0.1 * stage size) per stage, and another seed holds out other records
    recs = make_records(300, seed=3)
    c = config(tmp_path, data_file, eval_fraction=0.1)
    phases = build_phases(recs)
    sizes = {str(k + 1): len(p.records) for k, p in enumerate(phases)}
    assert {k: len(v) for k, v in first.items()} == {k: round(0.1 * n) for k, n in sizes.items()}
    other = make_splits(recs, phases, c.data, seed=c.seed + 1)
    assert {s.name: sorted(s.heldout_ids) for s in other.stages} != first


def test_unscored_data_one_off_holds_out_one_stage(tmp_path, tokenizer):
    rows = [{"instruction": r.instruction, "input": r.input, "output": r.output}
            for r in make_records(40)]
    path = write_jsonl(tmp_path / "plain.jsonl", rows)
    prep = prepare_config(config(tmp_path, path, "oneoff", eval_fraction=0.25), tokenizer)
    assert [(s.stage.name, s.stage.metric, len(s.examples)) for s in prep.stage_evals] == [
        ("all", "all_loss", 10)]


def test_replay_draws_round_replay_times_n_k_from_earlier_training_records(
        tmp_path, data_file, tokenizer):
    c = config(tmp_path, data_file, eval_fraction=0.1, replay=0.5)
    prep = prepare_config(c, tokenizer)
    own = [set(p.examples.record_ids[:p.own].tolist()) for p in prep.phases]
    held = {i for s in prep.stage_evals for i in s.examples.record_ids.tolist()}
    assert prep.phases[0].replayed == 0
    for k, p in enumerate(prep.phases[1:], 1):
        replayed = p.examples.record_ids[p.own:].tolist()
        assert len(replayed) == round(0.5 * p.own) == len(p.draw.ids), k
        assert set(replayed) <= set().union(*own[:k]), "only earlier phases' training records"
        assert not set(replayed) & held
        assert len(set(replayed)) == len(replayed)  # without replacement
    again = prepare_config(config(tmp_path / "again", data_file, eval_fraction=0.1, replay=0.5),
                           tokenizer)
    assert [p.draw.ids for p in again.phases] == [p.draw.ids for p in prep.phases]
    other = draw_replay([sorted(x) for x in own], 0.5, seed=c.seed + 1)
    assert [d.ids for d in other] != [p.draw.ids for p in prep.phases]
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert [p["replayed_examples"] for p in report["phases"]] == [p.replayed for p in prep.phases]
    totals = report["run_tokens"]
    assert totals["with_replay"] == totals["without_replay"] + sum(
        p["replayed_tokens"] for p in report["phases"]) > totals["without_replay"]


def test_replay_capped_at_what_earlier_phases_have_and_said(tmp_path, data_file, tokenizer):
    c = config(tmp_path, data_file, order="3,2,1", replay=5.0)  # stage 3 is the smallest
    prep = prepare_config(c, tokenizer)
    p2 = prep.phases[1]
    assert p2.draw.short and len(p2.draw.ids) == p2.draw.available == prep.phases[0].own
    assert any("phase 2 replays all" in n for n in prep.notes)
    assert "phase 2 replays all" in prep.summary()


def test_stats_shows_the_same_draws_and_the_token_cost(tmp_path, data_file, capsys):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("from phased_jax.config import get_default_config\n\n"
                   "def get_config():\n    c = get_default_config()\n"
                   f"    c.data.paths = ({str(data_file)!r},)\n"
                   "    c.data.eval_fraction = 0.1\n    c.data.replay = 0.5\n    return c\n")
    assert stats_main(["--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    recs = make_records(300, seed=3)
    c = get_default_config()
    c.data.eval_fraction, c.data.replay = 0.1, 0.5
    splits = make_splits(recs, build_phases(recs), c.data, c.seed)
    held = ", ".join(f"stage {s.name} {len(s.heldout_ids)} of {s.records}" for s in splits.stages)
    assert f"held out for the forgetting matrix (data.eval_fraction=0.1): {held}" in out
    draws = ", ".join(f"phase {k + 1} +{len(d.ids)} of {d.available} earlier"
                      for k, d in enumerate(splits.replay) if k)
    assert f"replay (data.replay=0.5): {draws}" in out
    assert "against data.replay=0" in out
