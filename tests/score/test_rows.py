"""The scored output keeps each record's own input row, and never a neighbour's."""

import json

from phased_jax.data.records import read_records
from phased_jax.score.rows import input_rows


def test_rows_are_kept_whole_and_never_shifted_by_a_skipped_record(tmp_path):
    rows = [{"instruction": "a", "input": "", "output": "x", "extra": 1},
            {"instruction": "", "input": "", "output": "y", "extra": 2},  # invalid: skipped
            {"instruction": "c", "input": "", "output": "z", "extra": 3}]
    pretty = tmp_path / "pretty.json"  # one row per line: each record finds its own row
    pretty.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    one_line = tmp_path / "one_line.json"  # all rows on one line, one of them skipped
    one_line.write_text(json.dumps(rows))
    for path, extras in ((pretty, [1, 3]), (one_line, [None, None])):
        records, invalid = read_records(str(path), "alpaca", on_invalid="skip")
        assert [r.instruction for r in records] == ["a", "c"] and sum(invalid.counts.values()) == 1
        out = input_rows(records, 1 << 20)
        assert [o["instruction"] for o in out] == ["a", "c"]  # the record's own text, always
        assert [o.get("extra") for o in out] == extras
