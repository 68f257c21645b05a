"""benchmarks/pipeline.py's conversation table runs and checks its ids against transformers'."""

import re

from benchmarks.pipeline import conversation_table


def test_conversation_table(capsys):
    conversation_table(40, 512)
    out = capsys.readouterr().out
    same, whole = map(int, re.search(r"ids equal to transformers' in (\d+) of the (\d+)", out)
                      .groups())
    assert same == whole > 0
    assert "transformers (ids + assistant mask)" in out
