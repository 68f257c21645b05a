"""Tied word embeddings (`tie_word_embeddings`, as Llama-3.2 1B/3B): transformers' tied Llama
loads as a model with no head of its own, computes the same logits, and goes back to the same
files save_pretrained writes (no `lm_head.weight`)."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import phased_jax.hf as hf
from phased_jax.errors import CheckpointError
from phased_jax.model.config import get_preset
from phased_jax.model.params import abstract_params

from .conftest import save_hf_model
from .helpers import assert_same_tensors, read_safetensors_dir

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4  # max |logit difference|, float32 on CPU (as test_parity)
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """(directory, torch model): a tiny tied GQA Llama saved by transformers."""
    directory, model = save_hf_model(tmp_path_factory, "tied", "llama", num_key_value_heads=2,
                                     tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return directory, model


def test_logits_match_transformers(tied):
    directory, torch_model = tied
    model, params = hf.load(directory, dtype="float32")
    assert model.cfg.tie_word_embeddings and set(params) == {"embed", "layers", "final_norm"}
    ids = np.random.RandomState(0).randint(3, model.cfg.vocab_size, size=(2, 24))
    with torch.no_grad():
        want = torch_model(torch.tensor(ids)).logits.numpy()
    got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids)))
    assert np.abs(got - want).max() <= TOL
    assert np.abs(want).max() > 0.5  # large enough that a wrong head would show
    # The head really is the embedding: an untied model with some other head differs.
    untied = type(model)(model.cfg.replace(tie_word_embeddings=False))
    other = dict(params, lm_head=jnp.asarray(np.random.RandomState(1).standard_normal(
        (model.cfg.hidden_size, model.cfg.vocab_size)), jnp.float32))
    untied_apply = jax.jit(untied.apply)
    assert np.abs(np.asarray(untied_apply({"params": other}, jnp.asarray(ids))) - want).max() > 0.5
    with_embed_t = dict(params, lm_head=params["embed"].T)
    np.testing.assert_array_equal(
        np.asarray(untied_apply({"params": with_embed_t}, jnp.asarray(ids))), got)


def test_round_trip_writes_what_save_pretrained_writes(tied, tmp_path):
    directory, torch_model = tied
    model, params = hf.load(directory)
    out = hf.save(tmp_path / "out", model, params)
    saved = read_safetensors_dir(out)
    assert HEAD not in saved
    assert_same_tensors(read_safetensors_dir(directory), saved)  # same names, bit-exact
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    ids = torch.tensor(np.random.RandomState(1).randint(0, model.cfg.vocab_size, size=(1, 16)))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, torch_model(ids).logits)


def _with_head(directory, dst, head):
    shutil.copytree(directory, dst)
    tensors = load_file(dst / "model.safetensors")
    save_file({**tensors, HEAD: head(tensors[EMBED])}, dst / "model.safetensors")
    return tensors


def test_repeated_head_equal_to_embedding_loads(tied, tmp_path):
    """Older exports repeat the tied head; a repeat that equals the embedding is accepted."""
    directory, _ = tied
    _with_head(directory, tmp_path / "dup", lambda e: e.copy())
    _, params = hf.load(tmp_path / "dup")
    _, want = hf.load(directory)
    assert set(params) == set(want)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_repeated_head_that_differs_is_refused(tied, tmp_path):
    directory, _ = tied

    def nudged(e):
        e = e.copy()
        e[5, 3] = np.nextafter(e[5, 3], np.float32(np.inf))  # one ulp, one element
        return e

    _with_head(directory, tmp_path / "bad", nudged)
    with pytest.raises(CheckpointError, match=rf"tensor '{HEAD}' differs from '{EMBED}'") as e:
        hf.load(tmp_path / "bad")
    assert "\n" not in str(e.value) and "tie_word_embeddings" in str(e.value)


def test_untied_checkpoint_still_needs_its_head(tied, tmp_path):
    """An untied config.json whose checkpoint lacks the head is refused, naming it."""
    directory, _ = tied
    dst = tmp_path / "untied"
    shutil.copytree(directory, dst)
    d = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**d, "tie_word_embeddings": False}))
    with pytest.raises(CheckpointError, match=f"missing tensor '{HEAD}'"):
        hf.load(dst)


def test_untied_params_under_a_tied_config_are_refused(tmp_path):
    """Exporting would drop the head silently; refused, naming it."""
    cfg = get_preset("tiny-llama")
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract_params(cfg))
    with pytest.raises(CheckpointError, match="params hold 'lm_head'.*tie_word_embeddings=True"):
        hf.save(tmp_path / "out", cfg.replace(tie_word_embeddings=True), params)
    assert not (tmp_path / "out").exists()


def test_config_translation_keeps_the_tie():
    cfg = get_preset("tiny-llama", tie_word_embeddings=True)
    d = hf.hf_config_from(cfg)
    assert d["tie_word_embeddings"] is True
    assert hf.config_from_hf(d) == cfg
    assert not hf.config_from_hf({**d, "tie_word_embeddings": False}).tie_word_embeddings
    del d["tie_word_embeddings"]  # transformers' Llama default: untied
    assert not hf.config_from_hf(d).tie_word_embeddings


def test_init_from_loads_a_tied_checkpoint_sharded_and_refuses_a_tie_mismatch(tied):
    from phased_jax.config import get_default_config, model_section
    from phased_jax.errors import ConfigError
    from phased_jax.init_from import resolve_model
    from phased_jax.train import build_trainer
    from phased_jax.train.runner import _initial_params

    directory, _ = tied
    model, want = hf.load(directory)
    c = get_default_config()
    shape = {k: getattr(model.cfg, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
        "num_kv_heads", "head_dim", "tie_word_embeddings")}
    c.model = model_section("tiny-llama", **shape, dtype="float32", param_dtype="float32")
    c.mesh.shape = (2, 2, 2)
    trainer = build_trainer(c)
    got = _initial_params(str(directory), trainer.model_cfg, trainer.param_shardings)
    assert set(got) == set(want) and got["embed"].sharding == trainer.param_shardings["embed"]
    np.testing.assert_array_equal(np.asarray(got["embed"]), np.asarray(want["embed"]))
    c.model.init_from = str(directory)
    resolve_model(c)  # the tie agrees
    c.model.tie_word_embeddings = False  # refused from the two configs, before any weight
    with pytest.raises(ConfigError, match=r"model.tie_word_embeddings=False \(preset 'tiny-llama'\) "
                                          r"differs from True in model.init_from="):
        resolve_model(c)


def test_convert_round_trip_through_orbax(tied, tmp_path):
    """HF -> params checkpoint (model_config.json keeps the tie) -> sharded HF, bit-exact."""
    from phased_jax.cli import main
    from phased_jax.params_checkpoint import read_model_config

    directory, _ = tied
    assert main(["convert", str(directory), str(tmp_path / "orbax")]) == 0
    assert read_model_config(tmp_path / "orbax").tie_word_embeddings
    assert main(["convert", str(tmp_path / "orbax"), str(tmp_path / "hf"),
                 "--max-shard-size", "20KB"]) == 0
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert HEAD not in index["weight_map"]
    assert_same_tensors(read_safetensors_dir(directory), read_safetensors_dir(tmp_path / "hf"))
