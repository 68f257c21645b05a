"""A run that cannot finish fails in `prepare`, before tokenising or any step: empty phases and
phases of 0 steps are named with their numbers and the fix."""

import pytest

from phased_jax.config import get_default_config
from phased_jax.data.records import Record
from phased_jax.errors import DataError
from tests.data.conftest import make_records, prepare_config, write_jsonl


class NoTokenizer:
    """Fails the test if prepare() tokenises before it has checked the phases."""

    def __getattr__(self, name):
        raise AssertionError(f"tokeniser used (.{name}) before the phases were checked")

    def __call__(self, *args, **kwargs):
        raise AssertionError("tokeniser called before the phases were checked")


def config(tmp_path, path, **data):
    c = get_default_config()
    c.output_dir = str(tmp_path / "run")
    c.data.paths = (str(path),)
    c.train.global_batch = 4
    for k, v in data.items():
        c.data[k] = v
    return c


def rows(records):
    return [{"id": r.id, "instruction": r.instruction, "input": r.input, "output": r.output,
             "score": r.score} for r in records]


def test_stage3_file_with_default_order_fails_in_prepare(shared_data, tmp_path):
    stage3 = shared_data / "alpaca-scored" / "en-alpaca52k-stage3.jsonl"
    c = config(tmp_path, stage3, on_invalid="skip")
    with pytest.raises(DataError) as e:
        prepare_config(c, NoTokenizer())
    msg = str(e.value)
    assert msg.startswith(f"phase 1 (stage 1, scores [1, 1.5)) has no records in {stage3}")
    assert "phase 2 (stage 2, scores [1.5, 3.5))" in msg
    assert "this data's scores span [3.5, 5]" in msg and 'use data.order="3"' in msg
    assert "\n" not in msg
    assert not (tmp_path / "run" / "token_cache").exists()  # failed before tokenising


def test_empty_middle_phase_suggests_the_nonempty_order(tmp_path):
    recs = [r for r in make_records(80) if not 1.5 <= r.score < 3.5]  # no stage-2 scores
    path = write_jsonl(tmp_path / "d.jsonl", rows(recs))
    c = config(tmp_path, path, order="2,1,3")
    with pytest.raises(DataError, match=r"^phase 1 \(stage 2, scores \[1\.5, 3\.5\)\) has no "
                                        r"records in .*d\.jsonl; .*use data\.order=\"1,3\""):
        prepare_config(c, NoTokenizer())
    c.data.tokenizer = str(tmp_path / "no-tokenizer-here")
    with pytest.raises(DataError, match="has no records"):  # before loading the tokenizer
        prepare_config(c)
    c.data.order = "1+2,3"  # a mixed phase with one empty stage still has records: fine so far
    with pytest.raises(AssertionError, match="tokeniser"):
        prepare_config(c, NoTokenizer())


def test_too_many_quantiles_names_the_phase(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows(make_records(3)))
    c = config(tmp_path, path, quantiles=4, order="1,2,3,4")
    with pytest.raises(DataError, match=r"phase 4 \(stage 4, quantile stage 4 of 4\) has no "
                                        r"records.*data\.quantiles <= 3"):
        prepare_config(c, NoTokenizer())


def test_phase_with_records_but_no_examples_is_caught(tmp_path, tokenizer):
    recs = make_records(60)
    path = write_jsonl(tmp_path / "d.jsonl", rows(recs))
    c = config(tmp_path, path, max_length=4)  # every authors prompt is longer: all skipped
    n1 = sum(r.score < 1.5 for r in recs)
    with pytest.raises(DataError) as e:
        prepare_config(c, tokenizer)
    msg = str(e.value)
    assert msg.startswith(f"phase 1 (stage 1) has {n1} records but 0 training examples, so 0 steps")
    assert f"{n1} skipped because the prompt fills data.max_length=4" in msg
    assert "train.global_batch=4" in msg and "raise data.max_length" in msg


def test_phase_emptied_by_eval_fraction_is_caught(tmp_path, tokenizer):
    recs = [r for r in make_records(60) if not 1.5 <= r.score < 3.5]
    recs.append(Record("solo", "Translate.", "", "Bonjour.", 2.0, "mem"))  # stage 2's only one
    path = write_jsonl(tmp_path / "d.jsonl", rows(recs))
    c = config(tmp_path, path, eval_fraction=0.6, max_length=64)
    with pytest.raises(DataError, match=r"phase 2 \(stage 2\) has 1 records but 0 training examples.*"
                                        r"1 held out by data\.eval_fraction=0\.6"):
        prepare_config(c, tokenizer)
