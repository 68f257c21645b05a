"""Every kind of bad checkpoint fails with a CheckpointError that names the file and the problem."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from safetensors.numpy import save_file

import phased_jax.hf as hf
from phased_jax.errors import CheckpointError
from phased_jax.model.config import get_preset

from .helpers import read_safetensors_dir


def _edit_config(directory, **changes):
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


def _rewrite_weights(directory, edit):
    tensors = read_safetensors_dir(directory)
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def _raises(directory, *patterns, **kwargs):
    with pytest.raises(CheckpointError) as info:
        hf.load(directory, **kwargs)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), str(info.value)
    return str(info.value)


def test_missing_config(hf_copy):
    (hf_copy / "config.json").unlink()
    _raises(hf_copy, "config.json", "missing")


def test_missing_architecture(hf_copy):
    _edit_config(hf_copy, architectures=None)
    _raises(hf_copy, re.escape(str(hf_copy / "config.json")), "missing 'architectures'")


def test_unknown_architecture(hf_copy):
    _edit_config(hf_copy, architectures=["GPT2LMHeadModel"])
    _raises(hf_copy, "unknown architecture", "GPT2LMHeadModel")


def test_missing_tensor(hf_copy):
    _rewrite_weights(hf_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _raises(hf_copy, "missing tensor 'model.layers.1.mlp.up_proj.weight'", "model.safetensors")


def test_wrong_shape(hf_copy):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)

    _rewrite_weights(hf_copy, edit)
    _raises(hf_copy, re.escape(str(hf_copy / "model.safetensors")),
            r"'model.layers.0.self_attn.k_proj.weight' has shape \[8, 32\], expected \[16, 32\]")


def test_unexpected_tensor(hf_copy):
    def edit(t):
        t["model.layers.0.self_attn.q_proj.bias"] = np.zeros((32,), np.float32)

    _rewrite_weights(hf_copy, edit)
    _raises(hf_copy, "unexpected tensor 'model.layers.0.self_attn.q_proj.bias'")


def test_truncated_safetensors(hf_copy):
    path = hf_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _raises(hf_copy, re.escape(str(path)), "truncated")


def test_missing_shard(hf_checkpoint, tmp_path):
    _, torch_model = hf_checkpoint("llama-gqa")
    torch_model.save_pretrained(tmp_path, max_shard_size="20KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    _raises(tmp_path, "model.safetensors.index.json", f"shard {victim.name}, which is missing")


@pytest.mark.parametrize("rope", [
    {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 8.0}},
])
def test_rope_scaling_refused(hf_copy, rope):
    _edit_config(hf_copy, **rope)
    _raises(hf_copy, "unsupported", "rope", re.escape(str(hf_copy / "config.json")))


@pytest.mark.parametrize("field,value", [
    ("attention_bias", True), ("mlp_bias", True),
    ("hidden_act", "gelu"), ("quantization_config", {"quant_method": "gptq"}),
])
def test_unsupported_config_fields(field, value):
    base = hf.hf_config_from(get_preset("tiny-llama"))
    with pytest.raises(CheckpointError, match=f"unsupported config field {field}"):
        hf.config_from_hf({**base, field: value}, source="x/config.json")


def test_pickle_refused_without_flag(hf_copy, hf_checkpoint):
    import torch

    _, torch_model = hf_checkpoint("llama-gqa")
    (hf_copy / "model.safetensors").unlink()
    torch.save(torch_model.state_dict(), hf_copy / "pytorch_model.bin")
    _raises(hf_copy, "pytorch_model.bin", "pickle", "allow_pickle=True")
    _, params = hf.load(hf_copy, allow_pickle=True)  # explicit opt-in reads it
    np.testing.assert_array_equal(np.asarray(params["embed"]),
                                  torch_model.model.embed_tokens.weight.detach().numpy())


def test_save_refuses_to_clobber(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint("llama-gqa")
    model, params = hf.load(directory)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        hf.save(tmp_path / "out", model, params)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dir left behind
    hf.save(tmp_path / "out", model, params, overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
