"""`phased-jax generate --run OUTPUT_DIR`: every phase of a run, and its final export, answered
in one process. The run is built directly (random tiny-llama params saved as a runner does:
`phases/phase<k>-<name>/` with the tokenizer, `hf/`), not trained, so the module stays short."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from phased_jax import hf, params_checkpoint
from phased_jax.cli import main as cli_main
from phased_jax.data.toy_tokenizer import build_tokenizer
from phased_jax.generate import decode, run
from phased_jax.hf.to_hf import tokenizer_files
from phased_jax.model.config import get_preset
from phased_jax.model.params import abstract_params
from phased_jax.model.transformer import Transformer

CFG = get_preset("tiny-llama", vocab_size=300, dtype="float32", param_dtype="float32")
TEXTS = ["Give three tips for staying healthy.", "What is the capital of France?",
         "Write a haiku about the sea."] * 10
# Every model decodes these shapes (batch 8 over data x fsdp = 2 x 4, prompts padded to 64,
# 6 new tokens), so the decoder compiles once for the module.
COMMON = ["--max-new-tokens", "6", "--max-length", "96", "--batch-size", "2",
          "--config.model.dtype=float32",
          "--config.mesh.shape=(2,-1,1)", "--length-multiple", "64"]
PHASES = ["phase1-stage1", "phase2-stage2"]


def random_params(seed: int) -> dict:
    """tiny-llama params drawn with numpy (no init to compile), large enough that greedy
    answers differ from one seed to the next."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (rng.standard_normal(a.shape) * 0.3).astype(a.dtype),
                        abstract_params(CFG))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished run's output_dir: two phases' params (each with the tokenizer) and hf/, the
    last phase's params exported, as `phased-jax train` leaves them."""
    root = tmp_path_factory.mktemp("run_dir")
    build_tokenizer(TEXTS, 300, root / "tok")
    out = root / "my-run"
    for seed, name in enumerate(PHASES, 1):
        params = random_params(seed)
        params_checkpoint.save_params(out / "phases" / name, CFG, params,
                                      extra_files=tokenizer_files(root / "tok"))
    hf.save(out / "hf", Transformer(CFG), params, tokenizer=root / "tok")
    return out


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("questions") / "test.jsonl"
    rows = [{"instruction": "Write a haiku about the sea.", "id": "a", "test_set": "koala"},
            {"instruction": "Give three tips.", "input": "staying healthy", "id": "b"},
            {"instruction": "What is the capital of France?", "id": "c", "test_set": "vicuna"}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return src


class Compiles:
    """Backend compiles of the decoder (jax's compile event, by function name)."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration" and "_decode" in str(
                kwargs.get("fun_name", "")):
            self.n += 1


def test_run_answers_every_phase_and_the_final_model(tmp_path, run_dir, questions,
                                                     monkeypatch, capsys):
    tokenizer_loads, per_model = [], []
    real_load, real_generate = run.load_tokenizer, run.generate_ids

    def load_tokenizer(*a, **k):
        tokenizer_loads.append(a)
        return real_load(*a, **k)

    compiles = Compiles()

    def generate_ids(*a, **k):  # the decoder's compiles while each model answers
        before = compiles.n
        out = real_generate(*a, **k)
        per_model.append(compiles.n - before)
        return out

    monkeypatch.setattr(run, "load_tokenizer", load_tokenizer)
    monkeypatch.setattr(run, "generate_ids", generate_ids)
    decode.decode_fn.cache_clear()  # a fresh decoder: the first model must compile it
    jax.monitoring.register_event_duration_secs_listener(compiles)
    try:
        out = tmp_path / "answers" / "my-run"
        assert cli_main(["generate", "--run", str(run_dir), "--input", str(questions),
                         "--output", str(out), *COMMON]) == 0
    finally:
        jax.monitoring.unregister_event_duration_listener(compiles)
    assert len(tokenizer_loads) == 1
    assert tokenizer_loads[0][0] == str(run_dir / "phases" / "phase1-stage1" / "tokenizer")
    assert per_model[0] > 0 and per_model[1:] == [0, 0], per_model  # compiled once, reused
    names = [*(f"{p}.jsonl" for p in PHASES), "final.jsonl"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no temp files left
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    generators = ["my-run/phase1-stage1", "my-run/phase2-stage2", "my-run"]
    for line, name, generator in zip(lines, names, generators, strict=False):  # last: the list
        assert line.startswith(f"wrote 3 answers by {generator!r} to {out / name} ("), line
    assert lines[-1] == f"wrote 3 answer files to {out}: {', '.join(names)}"
    got = {n: [json.loads(x) for x in (out / n).read_text().splitlines()] for n in names}
    for name, generator in zip(names, generators, strict=True):
        assert [(r["test_set"], r["id"], r["generator"]) for r in got[name]] == [
            ("koala", "a", generator), ("test", "b", generator), ("vicuna", "c", generator)]
    outputs = {n: [r["output"] for r in rows] for n, rows in got.items()}
    assert outputs["phase1-stage1.jsonl"] != outputs["phase2-stage2.jsonl"]  # each its own model
    assert outputs["final.jsonl"] == outputs["phase2-stage2.jsonl"]  # hf/ is the last phase's

    # Each file is what the one-model forms write for the same questions.
    for flag, name in ((["--checkpoint", str(run_dir / "phases" / "phase1-stage1")],
                        "phase1-stage1.jsonl"), (["--hf", str(run_dir / "hf")], "final.jsonl")):
        one = tmp_path / f"one-{name}"
        assert cli_main(["generate", *flag, "--input", str(questions), "--output", str(one),
                         *COMMON]) == 0
        assert one.read_text() == (out / name).read_text(), name


def test_generator_flag_names_the_run(tmp_path, run_dir, questions):
    """--generator stands for the run's name, so the phases' answers stay apart."""
    out = tmp_path / "out"
    assert cli_main(["generate", "--run", str(run_dir), "--input", str(questions), "--output",
                     str(out), "--generator", "mine", *COMMON]) == 0
    assert json.loads((out / "phase2-stage2.jsonl").read_text().splitlines()[0])["generator"] == (
        "mine/phase2-stage2")
    assert json.loads((out / "final.jsonl").read_text().splitlines()[0])["generator"] == "mine"


def _fake_phase(path: Path) -> None:
    """What params_complete checks, without the arrays: enough to list a run's phases."""
    (path / "params" / "d").mkdir(parents=True)
    (path / "params" / "_METADATA").write_text("{}")
    (path / "model_config.json").write_text(json.dumps(CFG.to_dict()))


def test_phases_in_numeric_order_and_hf_last(tmp_path):
    for name in ("phase10-stage3", "phase2-b", "phase9-x", "phase1-stage1"):
        _fake_phase(tmp_path / "phases" / name)
    (tmp_path / "phases" / ".phase3-y.tmp-0123abcd").mkdir()  # a killed write's leftover
    (tmp_path / "phases" / "notes.txt").write_text("not a phase")
    models = run.run_models(str(tmp_path))
    assert [m.label for m in models] == ["phase1-stage1", "phase2-b", "phase9-x", "phase10-stage3"]
    assert not any(m.hf for m in models)


def usage_error(capsys, argv: list[str]) -> str:
    assert cli_main(argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith("phased-jax generate: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_errors_are_one_line_and_write_nothing(tmp_path, run_dir, questions, capsys):
    out = tmp_path / "out"

    def fails(run_path: Path | str, output: Path = out) -> str:
        err = usage_error(capsys, ["generate", "--run", str(run_path), "--input", str(questions),
                                   "--output", str(output), *COMMON])
        assert not out.exists()
        return err

    bare = tmp_path / "not-a-run"
    bare.mkdir()
    err = fails(bare)
    assert f"--run {bare}: not a training run's output_dir (it has no phases/)" in err
    assert "phases/phase<k>-<name>/" in err and "checkpoint.phase_params=True" in err
    (bare / "phases").mkdir()
    assert "its phases/ holds no phase<k>-<name>/" in fails(bare)
    assert f"no such directory: {tmp_path / 'gone'} (--run" in fails(tmp_path / "gone")
    afile = tmp_path / "answers.jsonl"
    afile.write_text("")
    err = fails(run_dir, afile)
    assert f"--output: {afile} is a file, not a directory; with --run, --output is a folder" in err
    assert afile.read_text() == ""

    broken = tmp_path / "broken-run"
    shutil.copytree(run_dir, broken)
    (broken / "phases" / "phase2-stage2" / "model_config.json").unlink()  # a killed write
    err = fails(broken)
    assert f"--run {broken}: phases/phase2-stage2 is not a complete params checkpoint" in err
    shutil.copytree(run_dir / "phases" / "phase2-stage2", broken / "phases" / "phase2-stage2",
                    dirs_exist_ok=True)
    (broken / "hf" / "model.safetensors").write_bytes(b"torn")
    assert f"--run {broken}: hf/ is not a complete Hugging Face export" in fails(broken)


def test_run_with_another_model_flag_is_refused(run_dir, questions, capsys):
    argv = ["generate", "--run", str(run_dir), "--hf", str(run_dir / "hf"), "--input",
            str(questions), "--output", "x"]
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_help_documents_run(capsys):
    with pytest.raises(SystemExit):
        cli_main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--run OUTPUT_DIR" in text and "phases/phase<k>-<name>/" in text
    assert "final.jsonl" in text

