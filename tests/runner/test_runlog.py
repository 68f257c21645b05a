"""The run log never stops a resume: unreadable lines (a torn tail, a garbled line) are skipped
and counted; every readable event is kept, in order."""

from phased_jax.train.runlog import read_events


def test_unreadable_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "phase_log.jsonl"
    path.write_bytes(b'{"event": "step", "step": 1}\n'
                     b'\xff\xfe not json\n'
                     b'{"event": "step", "step": 2}\n'
                     b'{"event": "st')  # a kill mid-write
    events, skipped = read_events(path)
    assert [e["step"] for e in events] == [1, 2]
    assert skipped == 2
    assert read_events(tmp_path / "absent.jsonl") == ([], 0)
