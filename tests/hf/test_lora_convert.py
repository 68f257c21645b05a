"""`phased-jax convert --adapter`: a PEFT adapter made by peft itself, merged into its base (an
HF directory or a params checkpoint), equals peft's own `merge_and_unload()`; every adapter it
cannot use is one line, exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from phased_jax.cli import main

from .conftest import build_hf_model
from .helpers import read_safetensors_dir

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_peft_adapter(base: Path, out: Path, seed: int = 1, **config) -> Path:
    """A PEFT adapter of the model in `base` (all seven projections, A and B random so the
    update shows), saved by peft's save_pretrained."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    lora = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": MODULES,
                              "init_lora_weights": False, **config})
    peft.get_peft_model(model, lora).save_pretrained(out)
    return out


def adapter_of(arch_overrides: dict, root: Path, name: str) -> Path:
    """A PEFT adapter of a tiny Llama of other shapes (saved under root/name)."""
    base = root / f"{name}-base"
    build_hf_model("llama", **arch_overrides).save_pretrained(base)
    return save_peft_adapter(base, root / name)


@pytest.fixture(scope="module")
def lora(hf_checkpoint, tiny_tokenizer, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora_convert")
    directory, _ = hf_checkpoint("llama-gqa")
    base = root / "base"
    shutil.copytree(directory, base)
    tiny_tokenizer.save_pretrained(base)
    return {"root": root, "base": base, "adapter": save_peft_adapter(base, root / "adapter")}


@pytest.fixture(scope="module")
def peft_merged(lora) -> dict[str, np.ndarray]:
    """peft's merge_and_unload() of the adapter on the base, float32 tensors by HF name."""
    base = transformers.AutoModelForCausalLM.from_pretrained(lora["base"], dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(base, lora["adapter"]).merge_and_unload()
    return {k: v.numpy() for k, v in merged.state_dict().items()}


def test_merged_hf_equals_peft_merge_and_unload(lora, peft_merged, capsys):
    dst = lora["root"] / "merged"
    assert main(["convert", "--adapter", str(lora["adapter"]), str(lora["base"]), str(dst)]) == 0
    assert "with the LoRA adapter" in capsys.readouterr().out
    assert (dst / "tokenizer.json").is_file()  # carried from the base, as convert does
    ours = read_safetensors_dir(dst)
    assert sorted(ours) == sorted(peft_merged)
    assert all(ours[k].dtype == np.float32 for k in ours)
    # Not bitwise: torch's and XLA's CPU matmuls sum the rank-4 product B A in different
    # orders for some shapes (here k_proj and v_proj, 16 wide), so a few elements differ by a
    # float32 rounding of the update (max 6e-8 at weights ~0.15); the rest are equal.
    for k, v in ours.items():
        np.testing.assert_allclose(v, peft_merged[k], rtol=0, atol=1e-7, err_msg=k)
    assert all(np.array_equal(ours[k], peft_merged[k]) for k in ours if "k_proj" not in k
               and "v_proj" not in k)

    ids = torch.as_tensor(np.random.RandomState(0).randint(3, 128, size=(2, 12)))
    with torch.no_grad():
        base = transformers.AutoModelForCausalLM.from_pretrained(lora["base"],
                                                                 dtype=torch.float32)
        adapted = peft.PeftModel.from_pretrained(base, lora["adapter"]).eval()
        loaded = transformers.AutoModelForCausalLM.from_pretrained(dst).eval()
        want, got = adapted(ids).logits.numpy(), loaded(ids).logits.numpy()
        with adapted.disable_adapter():
            plain = adapted(ids).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(want - plain).max() > 1e-2  # the adapter changes them


def test_params_checkpoint_base_and_orbax_output(lora, peft_merged, capsys):
    """Either kind of base gives peft's merged tensors; --to orbax writes them as a params
    checkpoint (tokenizer in DST/tokenizer/, as convert's other params outputs)."""
    root, adapter = lora["root"], str(lora["adapter"])
    assert main(["convert", str(lora["base"]), str(root / "base-ckpt")]) == 0
    assert main(["convert", "--adapter", adapter, str(root / "base-ckpt"),
                 str(root / "from-ckpt")]) == 0
    assert main(["convert", "--adapter", adapter, str(lora["base"]), str(root / "merged-ckpt"),
                 "--to", "orbax"]) == 0
    assert (root / "merged-ckpt" / "tokenizer" / "tokenizer.json").is_file()
    assert main(["convert", str(root / "merged-ckpt"), str(root / "via-ckpt")]) == 0
    capsys.readouterr()
    for out in ("from-ckpt", "via-ckpt"):
        got = read_safetensors_dir(root / out)
        assert sorted(got) == sorted(peft_merged)
        for k, v in got.items():
            np.testing.assert_allclose(v, peft_merged[k], rtol=0, atol=1e-7, err_msg=f"{out}: {k}")


def test_bfloat16_merge_equals_peft_on_a_bfloat16_base(lora):
    """--dtype bfloat16: the base cast, then W + the float32 update rounded once, as peft
    merges (its adapters kept in float32) into a model loaded in bfloat16."""
    dst = lora["root"] / "merged-bf16"
    assert main(["convert", "--adapter", str(lora["adapter"]), str(lora["base"]), str(dst),
                 "--dtype", "bfloat16"]) == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(lora["base"], dtype=torch.bfloat16)
    want = peft.PeftModel.from_pretrained(base, lora["adapter"]).merge_and_unload().state_dict()
    got = transformers.AutoModelForCausalLM.from_pretrained(dst).state_dict()
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == torch.bfloat16, k
        np.testing.assert_array_equal(got[k].float().numpy(), v.float().numpy(), err_msg=k)


def _one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()  # what building the adapters printed
    assert main(["convert", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("phased-jax convert: error: ") and err.count("\n") == 1, err
    return err


def test_unusable_adapters_are_one_line_exit_2(lora, tmp_path, capsys):
    base, adapter, dst = str(lora["base"]), lora["adapter"], str(tmp_path / "out")

    err = _one_line_error(capsys, ["--adapter", str(tmp_path / "nope"), base, dst])
    assert "no such directory" in err and "--adapter" in err

    no_config = tmp_path / "no-config"
    no_config.mkdir()
    shutil.copy(adapter / "adapter_model.safetensors", no_config)
    assert "holds no adapter_config.json" in _one_line_error(
        capsys, ["--adapter", str(no_config), base, dst])

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(adapter / "adapter_config.json", no_weights)
    assert "no adapter_model.safetensors" in _one_line_error(
        capsys, ["--adapter", str(no_weights), base, dst])

    dora = tmp_path / "dora"
    shutil.copytree(adapter, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    err = _one_line_error(capsys, ["--adapter", str(dora), base, dst])
    assert f"{dora / 'adapter_config.json'}: use_dora=True: DoRA is not supported" in err

    wider = adapter_of({"hidden_size": 48, "num_key_value_heads": 2}, tmp_path, "wider")
    err = _one_line_error(capsys, ["--adapter", str(wider), base, dst])
    assert ("layers.0.self_attn.q_proj.lora_A.weight has shape (4, 48), expected (4, 32)"
            in err), err
    assert f"The base {base} has 2 layers, hidden_size 32" in err

    deeper = adapter_of({"num_key_value_heads": 2, "num_hidden_layers": 3}, tmp_path, "deeper")
    err = _one_line_error(capsys, ["--adapter", str(deeper), base, dst])
    assert "layers.2." in err and "(and 13 more) has no place in the base" in err, err

    assert "not --random" in _one_line_error(
        capsys, ["--adapter", str(adapter), "--random", dst])
    assert not Path(dst).exists()
