"""A tiny Llama-3-shaped model (theta 500,000, `llama3` RoPE scaling, tied embeddings, GQA) is
the same model in our decoder as in transformers: logits, a lossless round trip and greedy
generation past the original context, where the scaling changes the frequencies."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import phased_jax.hf as hf
from phased_jax.generate.decode import generate_ids

from .conftest import save_hf_model
from .helpers import assert_same_tensors, read_safetensors_dir

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, ORIGINAL, SEQ, EOS = 256, 32, 96, 2  # SEQ: three times the original context
TOL = 1e-4  # float32 logits, |ours - transformers|
SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": ORIGINAL}


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """(HF directory, torch model) of the tiny Llama-3.1-shaped model with tied embeddings."""
    return save_hf_model(
        tmp_path_factory, "llama3", "llama", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=128, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rms_norm_eps=1e-5, initializer_range=0.3, bos_token_id=1, eos_token_id=EOS,
        pad_token_id=0, tie_word_embeddings=True,
        rope_parameters={"rope_theta": 500000.0, **SCALING})


def test_config_arrives(llama3):
    directory, _ = llama3
    model, _ = hf.load(directory, dtype="float32")
    cfg = model.cfg
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.rope_scaling_factor) == (500000.0, "llama3", 8.0)
    assert cfg.rope_scaling_original_max_position == ORIGINAL and cfg.tie_word_embeddings


def test_logits_match_transformers_beyond_the_original_context(llama3):
    directory, torch_model = llama3
    model, params = hf.load(directory, dtype="float32")
    assert "lm_head" not in params  # tied: the head is the embedding table
    ids = np.random.RandomState(0).randint(3, VOCAB, size=(2, SEQ))
    with torch.no_grad():
        want = torch_model(torch.tensor(ids)).logits.numpy()
    got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids)))
    assert np.abs(got - want).max() <= TOL
    assert np.abs(want).max() > 0.5  # large enough that a wrong mapping would show
    # The scaling matters here: the same weights with plain RoPE differ beyond ORIGINAL.
    plain = model.cfg.replace(rope_scaling="none", rope_scaling_factor=1.0)
    unscaled = np.asarray(jax.jit(type(model)(plain).apply)({"params": params}, jnp.asarray(ids)))
    assert np.abs(unscaled[:, ORIGINAL:] - want[:, ORIGINAL:]).max() > 100 * TOL


def test_round_trip_is_bit_exact(llama3, tmp_path):
    directory, torch_model = llama3
    model, params = hf.load(directory)
    out = hf.save(tmp_path / "out", model, params)
    saved = read_safetensors_dir(out)
    assert "lm_head.weight" not in saved  # as save_pretrained writes a tied model
    assert_same_tensors(read_safetensors_dir(directory), saved)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert reloaded.config.tie_word_embeddings
    assert reloaded.config.rope_parameters["rope_type"] == "llama3"
    ids = torch.tensor(np.random.RandomState(1).randint(0, VOCAB, size=(1, SEQ)))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, torch_model(ids).logits)


def test_greedy_generation_matches_transformers(llama3):
    directory, torch_model = llama3
    new_tokens = 40  # prompts of 20-30 tokens run well past ORIGINAL
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (30, 20, 25)]
    expected = []
    for p in prompts:
        with torch.no_grad():
            seq = torch_model.generate(
                torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=new_tokens, do_sample=False, eos_token_id=EOS, pad_token_id=0)
        a = seq[0, len(p):].tolist()
        expected.append(a[: a.index(EOS) + 1] if EOS in a else a)
    model, params = hf.load(directory, dtype="float32")
    got = generate_ids(model, params, prompts, eos_token_ids=[EOS], max_new_tokens=new_tokens,
                       max_length=256, batch_size=4, keep_eos=True)
    assert got == expected
    assert max(len(p) + len(a) for p, a in zip(prompts, got, strict=True)) > ORIGINAL + 10
