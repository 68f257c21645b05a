"""`phased-jax generate` with LoRA adapters, unmerged: `--hf/--checkpoint BASE --adapter DIR`
answers as the model `convert --adapter` merges, and `--run` of a LoRA run puts each phase's
adapter on the run's base, read once. A peft-made adapter on a tiny HF Llama, sharded on 8 CPU
devices; on CPU decoding takes the per-layer path (`generate.cpu`), adapters inside layers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import pytest

from phased_jax.cli import main as cli_main
from phased_jax.data.toy_tokenizer import build_tokenizer
from phased_jax.generate import cpu, run

from .conftest import save_tiny_hf

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TEXTS = ["Give three tips for staying healthy.", "What is the capital of France?",
         "Write a haiku about the sea.", "User: Assistant: Input: Response:"] * 20
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Every call decodes these shapes, so the plain and the LoRA decoder compile once each.
COMMON = ["--max-new-tokens", "8", "--config.model.dtype=float32", "--batch-size", "2",
          "--config.data.template=alpaca", "--config.mesh.shape=(2,-1,1)",
          "--length-multiple", "64", "--generator", "g"]


def save_adapter(base: Path, out: Path, seed: int, **overrides) -> Path:
    """A peft adapter of `base` on every projection, A and B random (the answers change)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=MODULES, init_lora_weights=False,
                             **overrides)
    peft.get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> dict[str, Path]:
    """The base (HF, with its tokenizer, and as a params checkpoint), two adapters of it, the
    first merged by `convert --adapter`, and questions."""
    root = tmp_path_factory.mktemp("lora_generate")
    base = root / "base"
    save_tiny_hf("llama", base, vocab_size=300)
    build_tokenizer(TEXTS, 300, base)
    out = {"root": root, "base": base, "adapter": save_adapter(base, root / "adapter", 1),
           "adapter2": save_adapter(base, root / "adapter2", 2)}
    assert cli_main(["convert", "--adapter", str(out["adapter"]), str(base),
                     str(root / "merged")]) == 0
    assert cli_main(["convert", str(base), str(root / "base-ckpt")]) == 0
    out["merged"], out["ckpt"] = root / "merged", root / "base-ckpt"
    out["questions"] = root / "test.jsonl"
    out["questions"].write_text("".join(json.dumps(r) + "\n" for r in (
        {"instruction": "Write a haiku about the sea.", "id": "a"},
        {"instruction": "Give three tips.", "input": "staying healthy", "id": "b"},
        {"instruction": "What is the capital of France?", "id": "c"})))
    return out


def answers(lora: dict[str, Path], out: Path, *flags: str) -> list[str]:
    assert cli_main(["generate", *flags, "--input", str(lora["questions"]), "--output",
                     str(out), *COMMON]) == 0
    return [json.loads(line)["output"] for line in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def adapted(lora, tmp_path_factory) -> list[str]:
    """--hf BASE --adapter: the answers every other form must give."""
    out = tmp_path_factory.mktemp("adapted") / "answers.jsonl"
    return answers(lora, out, "--hf", str(lora["base"]), "--adapter", str(lora["adapter"]))


def test_adapter_answers_as_the_merged_model(lora, adapted, tmp_path):
    assert cpu.unstack_by_default(None) == (jax.default_backend() == "cpu")
    merged = answers(lora, tmp_path / "merged.jsonl", "--hf", str(lora["merged"]))
    assert adapted == merged and any(adapted)
    plain = answers(lora, tmp_path / "plain.jsonl", "--hf", str(lora["base"]))
    assert plain != adapted  # the adapter is used, not silently dropped
    ckpt = answers(lora, tmp_path / "ckpt.jsonl", "--checkpoint", str(lora["ckpt"]),
                   "--adapter", str(lora["adapter"]))
    assert ckpt == adapted


def test_run_of_a_lora_run_reads_the_base_once(lora, adapted, tmp_path, monkeypatch, capsys):
    """phases/ and adapter/ hold PEFT adapters (no hf/): each phase's answers are the base with
    that adapter; the base is adapter_config.json's base_model_name_or_path, or --base."""
    run_dir = tmp_path / "my-run"
    shutil.copytree(lora["adapter"], run_dir / "phases" / "phase1-stage1")
    shutil.copytree(lora["adapter2"], run_dir / "phases" / "phase2-stage2")
    shutil.copytree(lora["adapter2"], run_dir / "adapter")
    loads = []
    real = run.load_model

    def load_model(path, *a, **k):
        loads.append(path)
        return real(path, *a, **k)

    monkeypatch.setattr(run, "load_model", load_model)
    out = tmp_path / "answers"
    assert cli_main(["generate", "--run", str(run_dir), "--input", str(lora["questions"]),
                     "--output", str(out), *COMMON[:-2]]) == 0
    assert loads == [str(lora["base"])]  # peft recorded the base's path; read once for all
    got = {name: [json.loads(x) for x in (out / f"{name}.jsonl").read_text().splitlines()]
           for name in ("phase1-stage1", "phase2-stage2", "final")}
    assert [r["output"] for r in got["phase1-stage1"]] == adapted
    assert [r["output"] for r in got["phase2-stage2"]] != adapted
    assert [r["output"] for r in got["final"]] == [r["output"] for r in got["phase2-stage2"]]
    assert [r["generator"] for r in got["final"]] == ["my-run"] * 3
    assert got["phase1-stage1"][0]["generator"] == "my-run/phase1-stage1"

    # --base names the base instead (here the params checkpoint of the same model)
    for name in ("phase1-stage1", "phase2-stage2", "adapter"):
        config = run_dir / ("phases" if name != "adapter" else "") / name / "adapter_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()),
                                      "base_model_name_or_path": ""}))
    loads.clear()
    capsys.readouterr()
    err = one_line_error(capsys, ["--run", str(run_dir), "--input", str(lora["questions"]),
                                  "--output", str(tmp_path / "x")])
    assert "names no base model" in err and "--base DIR" in err
    assert cli_main(["generate", "--run", str(run_dir), "--base", str(lora["ckpt"]),
                     "--tokenizer", str(lora["base"]), "--input", str(lora["questions"]),
                     "--output", str(tmp_path / "again"), *COMMON]) == 0
    assert loads == [str(lora["ckpt"])]
    again = (tmp_path / "again" / "phase1-stage1.jsonl").read_text().splitlines()
    assert [json.loads(x)["output"] for x in again] == adapted


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert cli_main(["generate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("phased-jax generate: error: ") and err.count("\n") == 1, err
    return err


def test_unusable_adapters_and_flags_are_one_line_exit_2(lora, tmp_path, capsys):
    common = ["--input", str(lora["questions"]), "--output", str(tmp_path / "a.jsonl")]
    base = ["--hf", str(lora["base"])]

    err = one_line_error(capsys, [*base, "--adapter", str(tmp_path / "nope"), *common])
    assert "no such directory" in err and "--adapter" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no adapter_config.json" in one_line_error(
        capsys, [*base, "--adapter", str(empty), *common])

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(lora["adapter"] / "adapter_config.json", no_weights)
    assert "no adapter_model.safetensors" in one_line_error(
        capsys, [*base, "--adapter", str(no_weights), *common])

    dora = tmp_path / "dora"
    shutil.copytree(lora["adapter"], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    assert "use_dora=True: DoRA is not supported" in one_line_error(
        capsys, [*base, "--adapter", str(dora), *common])

    other = tmp_path / "other-base"  # the same architecture, narrower
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    err = one_line_error(capsys, [*base, "--adapter", str(save_adapter(other, tmp_path / "o", 3)),
                                  *common])
    assert "q_proj.lora_A.weight has shape (4, 32), expected (4, 64)" in err, err
    assert f"The base {lora['base']} has 2 layers, hidden_size 64" in err

    assert "--adapter goes with --hf or --checkpoint" in one_line_error(
        capsys, ["--run", str(tmp_path), "--adapter", str(lora["adapter"]), *common])
    assert "--base is the base model of --run's adapters" in one_line_error(
        capsys, [*base, "--base", str(lora["base"]), *common])
    assert not (tmp_path / "a.jsonl").exists()
