"""HF -> ours -> HF is lossless, and what we write is a checkpoint transformers loads."""

from __future__ import annotations

import json

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec

import phased_jax.hf as hf
from phased_jax.hf import mapping
from phased_jax.model.params import abstract_params
from phased_jax.params_checkpoint import load_params, save_params

from .helpers import assert_same_tensors, read_safetensors_dir

HF_CLASS = {"llama-gqa": "LlamaForCausalLM", "mistral-window": "MistralForCausalLM"}


@pytest.mark.parametrize("case", sorted(HF_CLASS))
def test_round_trip_is_bit_exact_and_loads_in_transformers(hf_checkpoint, tmp_path, case):
    directory, torch_model = hf_checkpoint(case)
    model, params = hf.load(directory)
    out = hf.save(tmp_path / "out", model, params, max_shard_size="20KB")

    # Small shards: several files and an index that lists every tensor.
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert_same_tensors(read_safetensors_dir(directory), read_safetensors_dir(out))
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert type(reloaded).__name__ == HF_CLASS[case]
    if case == "mistral-window":
        assert reloaded.config.sliding_window == 8
    ids = torch.tensor(np.random.RandomState(1).randint(0, 128, size=(1, 40)))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, torch_model(ids).logits)


def test_sharded_hf_checkpoint_loads(hf_checkpoint, tmp_path):
    directory, torch_model = hf_checkpoint("llama-gqa")
    torch_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    _, sharded = hf.load(tmp_path)
    _, single = hf.load(directory)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_load_and_export(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint("llama-gqa")
    model, params = hf.load(directory, dtype="bfloat16", compute_dtype="float32")
    assert model.cfg.param_dtype == "bfloat16" and model.cfg.dtype == "float32"
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}
    hf.save(tmp_path / "bf16", model, params)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    original = read_safetensors_dir(directory)
    exported = read_safetensors_dir(tmp_path / "bf16")
    for name, t in original.items():
        assert exported[name].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(exported[name], t.astype(ml_dtypes.bfloat16))


def test_save_from_sharded_params_and_orbax_restore_onto_a_mesh(hf_checkpoint, tmp_path):
    """Params spread over 4 devices export exactly; Orbax restores them onto another mesh."""
    directory, _ = hf_checkpoint("llama-gqa")
    model, params = hf.load(directory)
    mesh = jax.make_mesh((4,), ("fsdp",), devices=jax.devices()[:4],
                         axis_types=(jax.sharding.AxisType.Auto,))

    def shard_first_axis(x):
        spec = PartitionSpec("fsdp") if x.shape[0] % 4 == 0 else PartitionSpec()
        return NamedSharding(mesh, spec)

    shardings = jax.tree.map(shard_first_axis, params)
    _, sharded = hf.load(directory, shardings=shardings)  # lands sharded, leaf by leaf
    assert len(sharded["embed"].sharding.device_set) == 4
    hf.save(tmp_path / "hf", model, sharded)
    assert_same_tensors(read_safetensors_dir(directory), read_safetensors_dir(tmp_path / "hf"))

    save_params(tmp_path / "orbax", model.cfg, sharded)
    cfg, restored = load_params(tmp_path / "orbax", mesh_shardings=shardings)
    assert cfg == model.cfg
    assert restored["lm_head"].sharding == shardings["lm_head"]
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tokenizer_is_saved(hf_checkpoint, tmp_path, tiny_tokenizer):
    directory, _ = hf_checkpoint("llama-gqa")
    model, params = hf.load(directory)
    hf.save(tmp_path / "with_tok", model, params, tokenizer=tiny_tokenizer)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "with_tok")
    assert tok("w1 w2")["input_ids"] == tiny_tokenizer("w1 w2")["input_ids"]
    hf.save(tmp_path / "from_dir", model, params, tokenizer=tmp_path / "with_tok")
    assert (tmp_path / "from_dir" / "tokenizer.json").is_file()


def test_config_translation_round_trips():
    from phased_jax.model.config import PRESETS

    for name, cfg in PRESETS.items():
        back = hf.config_from_hf(hf.hf_config_from(cfg))
        assert back == cfg, name
    mistral = hf.hf_config_from(PRESETS["mistral-7b-v0.1"])
    assert hf.config_from_hf({**mistral, "sliding_window": None}).sliding_window == 0
    legacy = {k: v for k, v in mistral.items() if k not in ("rope_parameters", "sliding_window")}
    legacy_cfg = hf.config_from_hf({**legacy, "rope_theta": 1e6})
    assert (legacy_cfg.rope_theta, legacy_cfg.sliding_window) == (1e6, 4096)  # HF's defaults


@pytest.mark.parametrize("tied", [False, True])
def test_mapping_covers_every_param(tied):
    from phased_jax.model.config import get_preset

    cfg = get_preset("tiny-mistral", tie_word_embeddings=tied)
    leaves = {tuple(k.key for k in path) for path, _ in
              jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]}
    assert leaves == {rule.path for rule in mapping.rules(cfg)}
    names = [n for n, _ in mapping.hf_tensor_specs(cfg)]
    assert len(names) == len(set(names)) == (2 if tied else 3) + 9 * cfg.num_layers
