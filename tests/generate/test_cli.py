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
from tests.xla import xla_flags

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


# One subprocess per device count runs both README forms through the CLI, as a user does:
# most users have one device, which the suite's 8 fake devices never showed (the decode path
# crashed placing one layer of a stack placed on a one-device mesh).
_FORMS = """
import sys
from phased_jax.cli import main
model, ckpt, src, out, forms = sys.argv[1:6]
common = sys.argv[6:]
for name, flag in (("hf", ["--hf", model]), ("ckpt", ["--checkpoint", ckpt, "--tokenizer", model])):
    if name not in forms.split(","):
        continue
    assert main(["generate", *flag, "--input", src, "--output", f"{out}-{name}.jsonl", *common]) == 0
"""


@pytest.mark.parametrize(("devices", "forms"), [(1, ["hf", "ckpt"]), (2, ["hf"])])
def test_cli_on_few_devices_matches_eight(tmp_path, model_dir, devices, forms):
    """Both README forms on one device (where the decode path once crashed); on two, where it
    did not, one form keeps the suite short."""
    import os
    import subprocess
    import sys

    from phased_jax import params_checkpoint

    model, params = load_hf(model_dir)
    ckpt = params_checkpoint.save_params(tmp_path / "ckpt", model.cfg, params)
    src = tmp_path / "test.jsonl"
    src.write_text('{"instruction": "Write a haiku about the sea."}\n{"instruction": "Hi"}\n')
    assert cli_main(["generate", "--hf", str(model_dir), "--input", str(src), "--output",
                     str(tmp_path / "eight.jsonl"), *COMMON, "--generator", "g"]) == 0  # 8 devices
    common = [*(a for a in COMMON if not a.startswith("--config.mesh")), "--generator", "g"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if devices > 1:
        env["XLA_FLAGS"] = xla_flags(devices)
    proc = subprocess.run([sys.executable, "-c", _FORMS, str(model_dir), str(ckpt), str(src),
                           str(tmp_path / "few"), ",".join(forms), *common], env=env, capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stdout.count("wrote 2 answers by 'g'") == len(forms)
    eight = (tmp_path / "eight.jsonl").read_text()
    for form in forms:
        assert (tmp_path / f"few-{form}.jsonl").read_text() == eight, form


def test_input_reads_every_training_format(tmp_path, model_dir):
    """--input takes what `train` and `phased-score` read: an Alpaca list, the authors' JSONL."""
    from phased_jax.generate.testsets import read_test_set

    alpaca = tmp_path / "mine.json"
    alpaca.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"},
                                  {"instruction": "Add", "input": "2 and 3", "output": ""}]))
    assert [(i.test_set, i.id, i.instruction, i.input) for i in read_test_set(alpaca)] == [
        ("mine", "1", "Say hi", ""), ("mine", "2", "Add", "2 and 3")]
    authors = tmp_path / "stage3.jsonl"
    authors.write_text(json.dumps({"id": "46229", "score": "5\n\n", "data": ["Add\n2 and 3", "5"]})
                       + "\n")
    assert [(i.id, i.instruction, i.input) for i in read_test_set(authors)] == [
        ("46229", "Add", "2 and 3")]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "ok"}, {"input": "no instruction"}]))
    with pytest.raises(Exception, match=r"bad\.json:1 \(item 2\): needs a non-empty string field"):
        read_test_set(bad)


def test_generator_is_named_after_the_run():
    from phased_jax.generate.run import generator_name

    assert generator_name("runs/l7b-phased/hf") == "l7b-phased"
    assert generator_name("runs/l7b-phased/phases/phase2-stage2") == "l7b-phased/phase2-stage2"
    assert generator_name("exported/my-model") == "my-model"


def test_layer_views_of_a_stack_on_a_one_device_mesh():
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from phased_jax.generate.cpu import layer_views

    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    stack = jax.device_put(np.arange(24, dtype=np.float32).reshape(2, 3, 4),
                           NamedSharding(mesh, PartitionSpec(None, "fsdp", None)))
    views = layer_views(stack)
    assert [v.shape for v in views] == [(3, 4), (3, 4)]
    assert views[1].sharding.spec == PartitionSpec("fsdp", None)
    np.testing.assert_array_equal(np.asarray(views[1]), np.asarray(stack)[1])
