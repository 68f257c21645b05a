"""Input formats, including the authors' real stage-3 release."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
from conftest import FAST, STAGE3, write_alpaca
from phased_tools.records import FORMATS, load_answers, load_records
from phased_tools.score import main

from phased_jax.formats import InputError, parse_score_text


def test_authors_format_and_split(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"id": "1", "score": "4\n\n", "data": ["Do this.\nwith\ninput", "ok"]}) + "\n"
                 + json.dumps({"id": "2", "score": "3.5", "data": ["Just this.", ""]}) + "\n")
    recs, rep = load_records(p)
    assert rep.format == "authors" and rep.n == 2 and rep.empty_output_lines == [2]
    assert (recs[0].instruction, recs[0].input, recs[0].prior_score) == ("Do this.", "with\ninput", 4.0)
    assert (recs[1].instruction, recs[1].input, recs[1].output) == ("Just this.", "", "")


def test_bad_authors_row(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"id": "1", "data": ["x", "y"]}) + "\n" + json.dumps({"id": "2", "data": ["x"]}) + "\n")
    with pytest.raises(InputError, match=r"a.jsonl:2: field 'data' must be a list of two strings"):
        load_records(p)


def test_alpaca_errors(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"instruction": "x", "output": "y"}, {"instruction": "x"}]))
    with pytest.raises(InputError, match=r"a.json:2: missing field 'output'"):
        load_records(p)
    p.write_text("[{\"instruction\": ")
    with pytest.raises(InputError, match=r"a.json:1: not valid JSON"):
        load_records(p)
    with pytest.raises(InputError, match="no such file"):
        load_records(tmp_path / "nope.json")


@pytest.mark.parametrize("s,v", [("5", 5.0), ("4\n\n", 4.0), (" 4.125 ", 4.125), (3.5, 3.5), ("x", None), (None, None)])
def test_parse_score_text(s, v) -> None:
    assert parse_score_text(s) == v


def test_authors_stage3_parses_in_full(capsys) -> None:
    if not STAGE3.is_file():
        pytest.skip(f"shared data not found at {STAGE3} (the authors' stage-3 release; see ../shared/data/README.md)")
    recs, rep = load_records(STAGE3)
    assert rep.format == "authors" and rep.n == len(recs) == 6889
    assert len(rep.empty_output_lines) == 9  # kept, reported, never dropped
    scores = [r.prior_score for r in recs]
    assert all(s is not None and 3.5 <= s <= 5 for s in scores)
    assert abs(sum(scores) / len(scores) - 4.255) < 0.001
    assert len({r.raw["id"] for r in recs}) == 6889
    # The CLI reads it too: a dry run counts every row and warns about the empty outputs.
    assert main([str(STAGE3), "-o", "/nonexistent/never-written.jsonl", "--dry-run", "--cache", "/nonexistent/c.sqlite"]) == 0
    cap = capsys.readouterr()
    assert "6,889 records" in cap.out and "requests:          6,889" in cap.out
    assert "9 record(s) with an empty output" in cap.err


GOOD = b'{"instruction": "a", "output": "b"}\n'


@pytest.mark.parametrize("fmt,data,line", [
    ("jsonl", GOOD + b'{"instruction": "caf\xe9", "output": "b"}\n' + GOOD, 2),
    ("authors", b'{"id": "1", "data": ["x", "y"]}\n' * 2 + b'{"id": "3", "data": ["\xff", "y"]}\n', 3),
    ("alpaca", b'[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "\xc3(", "output": "b"}\n]\n', 3),
])
def test_a_bad_byte_is_a_bad_record_naming_file_and_line(tmp_path: Path, fmt: str, data: bytes, line: int) -> None:
    p = tmp_path / "data.txt"
    p.write_bytes(data)
    for forced in ("auto", fmt):
        with pytest.raises(InputError, match=rf"^{re.escape(str(p))}:{line}: not UTF-8 \(byte 0x[0-9a-f]{{2}} .*iconv"):
            load_records(p, forced)


@pytest.mark.parametrize("data,what", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8, "binary file (NUL bytes"),
    (bytes(range(128, 256)) * 64 + GOOD, "binary file (8192 of its first 8192 bytes are not UTF-8)"),
    (gzip.compress(GOOD * 100, mtime=0), "gzip-compressed; decompress it first"),
    ((GOOD * 3).decode().encode("utf-16"), "UTF-16 text, not UTF-8"),
], ids=["png", "not-utf8", "gzip", "utf16"])  # the same ids on every pytest-xdist worker
def test_a_binary_file_is_one_error_naming_it(tmp_path: Path, data: bytes, what: str) -> None:
    p = tmp_path / "data.jsonl"
    p.write_bytes(data)
    for fmt in FORMATS:
        with pytest.raises(InputError) as e:
            load_records(p, fmt)
        assert str(e.value).startswith(f"{p}: ") and what in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InputError, match=re.escape(what)):
        load_answers(p)


def test_a_record_over_the_limit_is_refused_before_parsing(tmp_path: Path) -> None:
    long_line = b'{"instruction": "' + b"x" * 3000 + b'", "output": "b"'  # not even valid JSON
    p = tmp_path / "data.jsonl"
    p.write_bytes(GOOD + long_line + b"\r\n" + GOOD)
    msg = rf"^{re.escape(str(p))}:2: record too long \(3,033 bytes > 1,000; raise the limit with --max-record-bytes"
    with pytest.raises(InputError, match=msg):
        load_records(p, max_record_bytes=1000)
    with pytest.raises(InputError, match=rf"{re.escape(str(p))}:2: not valid JSON"):
        load_records(p, max_record_bytes=3033)  # exactly at the limit: read, then parsed
    items = [{"instruction": "a", "output": "b"}, {"instruction": "x" * 3000, "output": "b"}]
    one_line = tmp_path / "list.json"  # a JSON list on one line is sized item by item, not as a line
    one_line.write_text(json.dumps(items))
    with pytest.raises(InputError, match=r"list.json:1: record too long \(item 2: 3,034 bytes > 1,000;"):
        load_records(one_line, max_record_bytes=1000)
    assert len(load_records(one_line, max_record_bytes=3034)[0]) == 2
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"test_set": "t", "id": "1", "instruction": "q", "output": "o" * 2000}) + "\n")
    with pytest.raises(InputError, match=r"answers.jsonl:1: record too long"):
        load_answers(answers, max_record_bytes=1000)


def test_score_cli_reports_bad_input_in_one_line_and_sends_nothing(
    tmp_path: Path, server, capsys: pytest.CaptureFixture[str]
) -> None:
    srv = server()
    cases = {
        "latin1.jsonl": (GOOD + b'{"instruction": "na\xefve", "output": "b"}\n', ":2: not UTF-8"),
        "blob.bin": (bytes(range(256)) * 100, ": a binary file"),
        "long.jsonl": (GOOD + b'{"instruction": "' + b"y" * 5000 + b'", "output": "b"}\n', ":2: record too long"),
    }
    for name, (data, what) in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        rc = main([str(p), "-o", str(tmp_path / "out.jsonl"), "--base-url", srv.base_url,
                   "--cache", str(tmp_path / "c.sqlite"), "--max-record-bytes", "4096", *FAST])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"phased-score: error: {p}{what}") and err.count("\n") == 1, err
    template = tmp_path / "tpl.txt"
    template.write_bytes(b"[user]\n{instruction} {output} \x96 quoted\n")
    good = write_alpaca(tmp_path / "in.json", 2)
    assert main([str(good), "-o", str(tmp_path / "out.jsonl"), "--template", str(template), *FAST]) == 2
    assert f"{template}:2: not UTF-8 (byte 0x96" in capsys.readouterr().err
    assert srv.entries() == [] and not (tmp_path / "out.jsonl").exists()
    with pytest.raises(SystemExit):
        main([str(good), "-o", str(tmp_path / "out.jsonl"), "--max-record-bytes", "0"])
