"""Bad bytes are a bad record, not a crash: non-UTF-8 lines, binary files and huge records."""

import json

import datasets
import pytest

from phased_jax.cli import main as cli_main
from phased_jax.config import get_default_config
from phased_jax.data import pipeline
from phased_jax.data.records import read_records
from phased_jax.errors import DataError
from tests.data.conftest import prepare_config

MB = 1_000_000


def line(i: int, **extra) -> bytes:
    row = {"id": str(i), "instruction": f"Explain item {i}.", "input": "", "output": "Done.",
           "score": 1.0 + i % 5}
    return json.dumps({**row, **extra}).encode()


def test_non_utf8_byte_on_line_3(tmp_path):
    lines = [line(i) for i in range(5)]
    lines[2] = lines[2].replace(b"item 2", b"item \xff2")
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=rf"^{path}:3: not UTF-8 \(byte 0xff at column \d+\) "
                                        r"\[not_utf8\]; .*on_invalid=skip") as e:
        read_records(str(path))
    assert "\n" not in str(e.value)
    recs, rep = read_records(str(path), on_invalid="skip")
    assert [r.id for r in recs] == ["0", "1", "3", "4"]
    assert rep.read == 5 and rep.counts == {"not_utf8": 1}
    assert rep.skipped[0]["source"] == f"{path}:3" and f"{path}:3: not UTF-8" in rep.summary()


def test_binary_file_is_one_error_naming_it(tmp_path):
    path = tmp_path / "weights.jsonl"
    path.write_bytes(bytes(range(256)) * 64)
    for on_invalid in ("error", "skip"):  # not a file of bad records: nothing to skip
        with pytest.raises(DataError, match=rf"^{path}: a binary file \(NUL byte at offset 0\)"):
            read_records(str(path), on_invalid=on_invalid)
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes(line(0).decode().encode("utf-16"))
    with pytest.raises(DataError, match="binary file.*UTF-16"):
        read_records(str(utf16))


def test_too_long_line_is_refused_unparsed(tmp_path, monkeypatch):
    huge = line(1, output="x" * (5 * MB))
    path = tmp_path / "d.jsonl"
    path.write_bytes(line(0) + b"\n" + huge + b"\r\n" + line(2) + b"\n")
    parsed = []
    real_loads = json.loads
    monkeypatch.setattr(json, "loads", lambda s, *a, **k: parsed.append(len(s)) or real_loads(s, *a, **k))
    with pytest.raises(DataError, match=rf"^{path}:2: record too long \({len(huge)} bytes > "
                                        rf"data.max_record_bytes={MB}\) \[too_long\]"):
        read_records(str(path), max_record_bytes=MB)
    recs, rep = read_records(str(path), on_invalid="skip", max_record_bytes=MB)
    assert [r.id for r in recs] == ["0", "2"] and rep.counts == {"too_long": 1}
    assert rep.skipped[0]["source"] == f"{path}:2"
    assert parsed and max(parsed) < 1000  # the huge line never reached the JSON parser
    recs, rep = read_records(str(path), on_invalid="skip", max_record_bytes=len(huge))
    assert len(recs) == 3  # exactly at the limit is allowed (the line ending does not count)


def test_default_limit_comes_from_the_config(tmp_path):
    assert get_default_config().data.max_record_bytes == MB
    path = tmp_path / "d.jsonl"
    path.write_bytes(line(0) + b"\n" + line(1, output="y" * (MB + 1)))  # no final newline
    recs, rep = read_records(str(path), on_invalid="skip")
    assert [r.id for r in recs] == ["0"] and rep.counts == {"too_long": 1}
    assert f"({len(line(1, output='y' * (MB + 1)))} bytes" in rep.skipped[0]["message"]


def test_alpaca_json_list_bad_bytes_and_long_elements(tmp_path):
    items = [{"instruction": f"Task {i}.", "input": "", "output": "Fine."} for i in range(4)]
    items[3]["output"] = "z" * 3000
    raw = json.dumps(items, indent=1).encode().replace(b"Task 1.", b"Task \xfe1.")
    path = tmp_path / "alpaca.json"
    path.write_bytes(raw)
    with pytest.raises(DataError, match=rf"^{path}:7: not UTF-8 \(byte 0xfe\)"):
        read_records(str(path), max_record_bytes=1000)
    recs, rep = read_records(str(path), on_invalid="skip", max_record_bytes=1000)
    assert [r.instruction for r in recs] == ["Task 0.", "Task 2."]
    assert rep.counts == {"not_utf8": 1, "too_long": 1}
    assert rep.skipped[1]["source"] == f"{path}:17" and "3" in rep.skipped[1]["message"]
    # A bad byte between elements breaks the list itself: one error with file and line.
    broken = json.dumps(items[:2], indent=1).encode().replace(b"},", b"}\xff,", 1)
    path.write_bytes(broken)
    with pytest.raises(DataError, match=rf"^{path}:6: not UTF-8 \(byte 0xff\); a JSON list"):
        read_records(str(path), on_invalid="skip")


def test_bom_and_crlf_still_read(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + line(0) + b"\r\n\r\n" + line(1) + b"\r\n")
    recs, rep = read_records(str(path))
    assert [r.source for r in recs] == [f"{path}:1", f"{path}:3"] and not rep.skipped


def test_hf_rows_over_the_limit_are_bad_records(tmp_path):
    rows = [{"instruction": "Short.", "input": "", "output": "Ok.", "score": 2.0},
            {"instruction": "Long.", "input": "", "output": "w" * 5000, "score": 3.0}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    recs, rep = read_records(str(tmp_path / "ds"), on_invalid="skip", max_record_bytes=1000)
    assert [r.instruction for r in recs] == ["Short."] and rep.counts == {"too_long": 1}


def test_prepare_skips_huge_record_before_tokenising(tmp_path, tokenizer, monkeypatch):
    lines = [line(i) for i in range(30)]
    lines[4] = line(4, output="q " * (2 * MB))  # 4 MB: tokenising it is what took 10 GB
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    seen = []
    real = pipeline.tokenize_cached
    monkeypatch.setattr(pipeline, "tokenize_cached",
                        lambda records, *a, **k: seen.extend(records) or real(records, *a, **k))
    c = get_default_config()
    c.output_dir = str(tmp_path / "run")
    c.data.paths = (str(path),)
    c.data.on_invalid = "skip"
    c.data.max_length = 64
    c.train.global_batch = 4
    prep = prepare_config(c, tokenizer)
    assert len(seen) == 29 and max(len(r.output) for r in seen) < 100
    report = json.loads(prep.report_path.read_text())["invalid"]
    assert report["counts"] == {"too_long": 1} and report["records"][0]["source"] == f"{path}:5"


def test_stats_cli_reads_through_the_same_checks(tmp_path, capsys):
    lines = [line(i) for i in range(10)]
    lines[2] = b"\x80" + lines[2]
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    cfg = tmp_path / "cfg.py"
    cfg.write_text("from phased_jax.config import get_default_config\n\ndef get_config():\n"
                   f"    c = get_default_config()\n    c.data.paths = ({str(path)!r},)\n"
                   "    return c\n")
    assert cli_main(["stats", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"phased-jax stats: error: {path}:3: not UTF-8") and err.count("\n") == 1
    assert cli_main(["stats", "--config", str(cfg), "--config.data.on_invalid=skip"]) == 0
    assert f"skipped 1 (not_utf8: 1)\n  {path}:3: not UTF-8" in capsys.readouterr().out
