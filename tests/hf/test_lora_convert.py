"""`phased-jax convert --adapter` and `phased_jax.hf.peft.merge`: a PEFT adapter made by peft
itself, merged into its base (an HF directory or a params checkpoint), equals peft's own
`merge_and_unload()`; every adapter it cannot use is one line, exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from phased_jax.cli import main
from phased_jax.hf.from_hf import load
from phased_jax.hf.peft import _lora_product, load_adapter, merge
from phased_jax.hf.to_hf import hf_tensors

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


def peft_merge(base: Path, adapter: Path, dtype=None) -> dict[str, np.ndarray]:
    """peft's merge_and_unload() of the adapter on the base loaded in `dtype` (float32 by
    default), as float32 numpy by HF name."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=dtype or torch.float32)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.float().numpy() for k, v in merged.state_dict().items()}


def reorder_bounds(adapter: Path) -> dict[str, np.ndarray]:
    """How far a float32 update (B @ A) * scale summed over r in another order than torch's can
    be from peft's, by HF name: r ulps of scale * |B| @ |A| (each of the r - 1 roundings of a
    partial sum is within half an ulp of it, in either order)."""
    from safetensors.numpy import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    r, scale = config["r"], config["lora_alpha"] / config["r"]
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    return {k.removeprefix("base_model.model.").replace(".lora_A", ""):
            r * np.spacing(np.abs(tensors[k.replace("lora_A", "lora_B")]) @ np.abs(v) * scale)
            for k, v in tensors.items() if ".lora_A." in k}


@pytest.fixture(scope="module")
def torch_sums_in_order() -> bool:
    """Whether torch's float32 `B @ A` ([64, r] @ [r, 48]) on this CPU and BLAS sums the r
    products of each element in order with one fused multiply-add each, as `merge` does (MKL on
    AVX-512 does): then the merge equals peft's bit for bit; otherwise only within the bounds
    of a sum in another order (`reorder_bounds`)."""
    rng = np.random.default_rng(0)
    for r in (4, 16):
        a = (rng.standard_normal((r, 48)) * 0.1).astype(np.float32)
        b = (rng.standard_normal((64, r)) * 0.1).astype(np.float32)
        if not np.array_equal(torch.from_numpy(b) @ torch.from_numpy(a),
                              _lora_product(a.T.copy(), b.T.copy()).T):
            return False
    return True


def assert_as_peft(ours: dict[str, np.ndarray], want: dict[str, np.ndarray],
                   bounds: dict[str, np.ndarray], bitwise: bool, where: str) -> None:
    """`ours` (float32 tensors by HF name) equal to peft's merged `want`: bit for bit if
    `bitwise`, else each adapted weight within its update's `reorder_bounds` plus the final
    rounding's ulp (and the rest bit for bit)."""
    assert sorted(ours) == sorted(want), where
    assert all(ours[k].dtype == np.float32 for k in ours), where
    assert set(bounds) <= set(want) and len(bounds) == 7 * 2, sorted(bounds)
    for k, v in want.items():
        if bitwise or k not in bounds:
            np.testing.assert_array_equal(
                ours[k], v, err_msg=f"{where}: {k}: bitwise, as torch's B @ A here sums r in "
                "order with one fma each (the probe)" if bitwise else f"{where}: {k}")
        else:
            excess = np.abs(ours[k].astype(np.float64) - v) - bounds[k] - np.spacing(np.abs(v))
            assert excess.max() <= 0, (
                f"{where}: {k} off peft's by more than a reordered float32 sum of the update "
                f"could be at {int((excess > 0).sum())} elements (compared so, not bitwise: "
                "torch's B @ A on this CPU/BLAS does not sum r in order with fma, the probe)")


@pytest.fixture(scope="module")
def peft_merged(lora) -> dict[str, np.ndarray]:
    """peft's merge_and_unload() of the adapter on the base, float32 tensors by HF name."""
    return peft_merge(lora["base"], lora["adapter"])


@pytest.mark.parametrize("case,seed,dtype", [("llama-gqa", 1, "float32"),
                                             ("mistral-window", 2, "float32"),
                                             ("llama-gqa", 3, "bfloat16")])
def test_merge_equals_peft_merge_and_unload(case, seed, dtype, hf_checkpoint, tmp_path,
                                            torch_sums_in_order):
    """float32: bit for bit where torch sums B @ A in order (the probe; GQA: k_proj and v_proj
    16 wide, where XLA's matmul sums r in another order); bfloat16: bit for bit either way."""
    base, _ = hf_checkpoint(case)
    adapter = save_peft_adapter(base, tmp_path / "adapter", seed=seed)
    model, params = load(base, dtype=dtype)
    spec, adapters = load_adapter(adapter, model.cfg)
    before = jax.tree.map(np.array, params)
    merged = merge(model.cfg, spec, params, adapters)
    assert all(np.asarray(x).dtype == np.dtype(dtype) for x in jax.tree.leaves(merged))
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(y), x)  # the base is left as it was
    ours = {k: np.asarray(v, np.float32) for k, v in hf_tensors(model.cfg, merged)}
    if dtype == "bfloat16":  # the float32 update's last bits are lost in bfloat16's rounding
        want = peft_merge(base, adapter, torch.bfloat16)
        assert sorted(ours) == sorted(want)
        for k, v in want.items():
            np.testing.assert_array_equal(ours[k], v, err_msg=f"{case} bfloat16: {k}")
        return
    assert_as_peft(ours, peft_merge(base, adapter), reorder_bounds(adapter), torch_sums_in_order,
                   f"{case} float32")


def test_merged_hf_equals_peft_merge_and_unload(lora, peft_merged, capsys):
    dst = lora["root"] / "merged"
    assert main(["convert", "--adapter", str(lora["adapter"]), str(lora["base"]), str(dst)]) == 0
    assert "with the LoRA adapter" in capsys.readouterr().out
    assert (dst / "tokenizer.json").is_file()  # carried from the base, as convert does
    # XLA's matmul sums r in its own order: bitwise in test_convert_adapter_is_bitwise
    assert_as_peft(read_safetensors_dir(dst), peft_merged, reorder_bounds(lora["adapter"]), False,
                   "convert --adapter")

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
        assert_as_peft(read_safetensors_dir(root / out), peft_merged,
                       reorder_bounds(lora["adapter"]), False, out)


def test_convert_adapter_is_bitwise(lora, peft_merged, torch_sums_in_order, tmp_path, capsys):
    """The CLI's float32 merge, from an HF base and from a params checkpoint, equals peft's
    bit for bit where torch sums B @ A in order (the probe), else within `reorder_bounds`."""
    adapter = str(lora["adapter"])
    assert main(["convert", str(lora["base"]), str(tmp_path / "base-ckpt")]) == 0
    for name, base in (("hf", lora["base"]), ("ckpt", tmp_path / "base-ckpt")):
        assert main(["convert", "--adapter", adapter, str(base), str(tmp_path / name)]) == 0
        assert_as_peft(read_safetensors_dir(tmp_path / name), peft_merged,
                       reorder_bounds(lora["adapter"]), torch_sums_in_order,
                       f"convert --adapter from {name}")
    capsys.readouterr()


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
