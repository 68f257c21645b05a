"""`phased-jax generate` end to end: a tiny HF Llama with a local tokenizer, sharded on 8 CPU devices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phased_jax.cli import main as cli_main
from phased_jax.config import get_default_config
from phased_jax.generate import generate
from phased_jax.generate.testsets import EXPECTED_SIZES
from phased_jax.sharding import Placement, place_params

from .conftest import load_hf, save_tiny_hf
from .test_testsets import write_sources

TEXTS = ["Give three tips for staying healthy.", "What is the capital of France?",
         "Write a haiku about the sea.", "User: Assistant: Input: Response:"] * 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from phased_jax.data.toy_tokenizer import build_tokenizer

    d = tmp_path_factory.mktemp("cli_model")
    save_tiny_hf("llama", d, vocab_size=300)
    build_tokenizer(TEXTS, 300, d)
    return d


# Both CLI runs use these shapes (batch 8 over data x fsdp = 2 x 4, prompts padded to 128,
# 12 new tokens), so the decoder compiles once for the module.
COMMON = ["--max-new-tokens", "12", "--config.model.dtype=float32", "--batch-size", "2",
          "--config.data.template=alpaca", "--config.mesh.shape=(2,-1,1)", "--length-multiple", "128"]


def _hf_greedy_text(model_dir: Path, tok, ids: list[list[int]]) -> list[str]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for p in ids:
        with torch.no_grad():
            seq = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(seq[0, len(p):], skip_special_tokens=True))
    return out


def test_cli_answers_in_input_order_and_match_transformers(tmp_path, model_dir):
    rows = [{"instruction": "Write a haiku about the sea.", "id": "a", "test_set": "koala"},
            {"instruction": "Give three tips.", "input": "staying healthy", "id": "b"},
            {"instruction": "What is the capital of France? " * 3, "id": "c", "test_set": "vicuna"}]
    src = tmp_path / "test.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "answers.jsonl"
    rc = cli_main(["generate", "--hf", str(model_dir), "--input", str(src), "--output", str(out),
                   *COMMON])
    assert rc == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(g["id"], g["test_set"]) for g in got] == [("a", "koala"), ("b", "test"), ("c", "vicuna")]
    assert set(got[0]) == {"test_set", "id", "instruction", "input", "output", "generator"}
    assert got[1]["input"] == "staying healthy"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left

    import transformers

    from phased_jax.data.templates import encode_prompt

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = [encode_prompt(r["instruction"], r.get("input", ""), "alpaca", tok) for r in rows]
    expected = _hf_greedy_text(model_dir, tok, ids)
    assert [g["output"] for g in got] == expected  # sharded over 8 devices, same tokens as HF
    assert any(expected)

    # The Python API the demo calls gives the same answers (and reuses the compiled decoder).
    model, params = load_hf(model_dir)
    assert model.cfg.dtype == "float32"
    mesh_cfg = get_default_config().mesh
    mesh_cfg.shape = (2, -1, 1)
    placement = Placement.from_config(mesh_cfg)
    params = place_params(model.cfg, params, placement)
    assert generate(model, params, tok, rows, template="alpaca", max_new_tokens=12,
                    batch_size=2, placement=placement, length_multiple=128) == expected


def test_cli_paper_sets_and_bad_input(tmp_path, model_dir, capsys):
    sources = write_sources(tmp_path / "src", EXPECTED_SIZES)
    out = tmp_path / "answers.jsonl"
    args = ["generate", "--hf", str(model_dir), "--test-sets", "paper", "--output", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--limit", "1", *COMMON,
            "--alpaca-eval-source", sources["alpaca_eval_source"],
            "--wizardlm-source", sources["wizardlm_source"], "--koala-source", sources["koala_source"]]
    assert cli_main(args) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["test_set"] for g in got] == sorted(EXPECTED_SIZES)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "fine"}\n{"instruction": ""}\n')
    rc = cli_main(["generate", "--hf", str(model_dir), "--input", str(bad), "--output", str(out)])
    assert rc == 1
    assert f"{bad}:2: needs a non-empty string field 'instruction'" in capsys.readouterr().err


def test_cli_orbax_checkpoint_gives_the_same_answers(tmp_path, model_dir):
    from phased_jax import params_checkpoint

    model, params = load_hf(model_dir)
    ckpt = params_checkpoint.save_params(tmp_path / "ckpt", model.cfg, params)
    src = tmp_path / "test.jsonl"
    src.write_text('{"instruction": "Write a haiku about the sea."}\n{"instruction": "Hi"}\n')
    outs = []
    for flag in (["--hf", str(model_dir)], ["--checkpoint", str(ckpt), "--tokenizer", str(model_dir)]):
        out = tmp_path / f"answers{len(outs)}.jsonl"
        assert cli_main(["generate", *flag, "--input", str(src), "--output", str(out), *COMMON,
                         "--generator", "g"]) == 0
        outs.append(out.read_text())
    assert outs[0] == outs[1]
