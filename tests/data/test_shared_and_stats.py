"""The authors' stage-3 file end to end, `phased-jax stats` through the CLI, and prepare()."""

import json

import pytest

from phased_jax.cli import main as cli_main
from phased_jax.config import get_default_config
from phased_jax.data.phases import build_phases
from phased_jax.data.pipeline import Batching
from phased_jax.data.records import read_records
from phased_jax.data.tokens import tokenize
from phased_jax.errors import DataError
from tests.data.conftest import make_records, prepare_config, write_jsonl

CONFIG = '''
from phased_jax.config import get_default_config

def get_config():
    c = get_default_config()
    c.data.paths = ({path!r},)
    c.output_dir = {out!r}
    return c
'''


@pytest.fixture(scope="module")
def stage3(shared_data):
    return shared_data / "alpaca-scored" / "en-alpaca52k-stage3.jsonl"


def test_stage3_loads_stratifies_tokenises(stage3, tokenizer):
    with pytest.raises(DataError, match=rf"{stage3.name}:2161: empty output \[empty_output\]"):
        read_records(str(stage3))
    recs, rep = read_records(str(stage3), on_invalid="skip")
    assert rep.read == 6889 and len(recs) == 6880 and rep.counts == {"empty_output": 9}
    phases = build_phases(recs)
    assert [p.size for p in phases] == [0, 0, 6880]
    assert round(phases[2].mean_score, 2) == 4.25
    ex, tok_rep = tokenize(recs, "authors", tokenizer, 2048)
    assert len(ex) == 6880 and not tok_rep.skipped


def write_config(tmp_path, data_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text(CONFIG.format(path=str(data_path), out=str(tmp_path / "run")))
    return cfg


def test_stats_cli_on_stage3(stage3, tmp_path, capsys, tokenizer_dir):
    cfg = write_config(tmp_path, stage3)
    assert cli_main(["stats", "--config", str(cfg)]) == 1
    assert "en-alpaca52k-stage3.jsonl:2161: empty output" in capsys.readouterr().err
    args = ["stats", "--config", str(cfg), "--config.data.on_invalid=skip",
            f"--config.data.tokenizer={tokenizer_dir}"]
    assert cli_main(args) == 1  # the default order 1,2,3: phases 1 and 2 are empty
    out, err = capsys.readouterr()
    assert "[3.5, 5]" in out  # the table first, showing where the scores lie
    assert "phase 1 (stage 1, scores [1, 1.5)) has no records" in err
    assert 'use data.order="3"' in err and len(err.strip().splitlines()) == 1
    assert cli_main([*args, "--config.data.order=3"]) == 0
    out = capsys.readouterr().out
    assert "read 6889 records, skipped 9 (empty_output: 9)" in out
    stage_row = next(line for line in out.splitlines() if line.startswith("3 ") and "[3.5, 5]" in line)
    assert "6,880" in stage_row and "4.25" in stage_row
    assert f"tokens ({tokenizer_dir})" in out


def test_stats_orders_help_and_words(tmp_path, capsys):
    recs = make_records(60)
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"id": r.id, "instruction": r.instruction, "input": r.input, "output": r.output,
         "score": r.score} for r in recs])
    cfg = write_config(tmp_path, path)
    assert cli_main(["stats", "--config", str(cfg), "--config.data.order=2,1+3"]) == 0
    out = capsys.readouterr().out
    assert "whitespace words" in out
    lines = out.split("phases in training order")[1].splitlines()
    assert lines[2].split()[:2] == ["1", "2"] and lines[3].split()[:2] == ["2", "1+3"]
    sizes = [p.size for p in build_phases(recs, "2,1+3")]
    assert f"{sizes[0]:,}" in lines[2]
    assert cli_main(["stats", "--help"]) == 0 and "--config" in capsys.readouterr().out
    assert cli_main(["stats", "--config", str(cfg), "--config.data.order=1,5"]) == 2  # usage
    assert "stage 5 outside" in capsys.readouterr().err


def test_prepare_end_to_end(tmp_path, tokenizer):
    rows = [{"id": r.id, "instruction": r.instruction, "input": r.input, "output": r.output,
             "score": r.score} for r in make_records(40)]
    rows[3]["output"] = ""
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    c = get_default_config()
    c.output_dir = str(tmp_path / "run")
    c.data.paths = (str(path),)
    c.data.on_invalid = "skip"
    c.data.max_length = 128
    c.data.packing = True
    c.train.global_batch = 4
    prep = prepare_config(c, tokenizer)
    assert [p.phase.name for p in prep.phases] == ["1", "2", "3"]
    assert sum(len(p.examples) for p in prep.phases) == 39
    report = json.loads(prep.report_path.read_text())
    assert report["invalid"]["counts"] == {"empty_output": 1}
    loader = prep.phases[1].loader(Batching.from_sections(c.train, c.data, c.seed))
    assert loader.batch(0)["input_ids"].shape == (4, 128) and loader.phase_index == 1
    assert list((tmp_path / "run" / "token_cache").glob("tokens-*.npz"))
