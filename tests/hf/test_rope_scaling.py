"""RoPE scaling (linear, llama3, yarn) equals transformers': frequencies, logits beyond the
pretraining context, greedy decoding with the KV cache, and config.json both ways."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import phased_jax.hf as hf
from phased_jax.errors import CheckpointError
from phased_jax.generate.decode import generate_ids
from phased_jax.model import rope
from phased_jax.model.config import PRESETS, get_preset
from phased_jax.model.transformer import Transformer

from .conftest import build_hf_model
from .helpers import padded_batch

TOL = 1e-4  # max |logit difference|, float32 on CPU (as tests/hf/test_parity.py)
ORIGINAL, SEQ, VALID = 64, 160, 131  # pretraining context; positions run well past it
# head_dim 16 and theta 500,000: with ORIGINAL = 64, llama3 and yarn each leave one frequency
# alone, interpolate one and scale the other six (asserted below), so every band is tested.
SHAPE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512)
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.5},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
}


def _hf_rope(config_dict: dict) -> tuple[np.ndarray, float]:
    """transformers' inv_freq and cos/sin multiplier for a config.json dict."""
    emb = LlamaRotaryEmbedding(transformers.LlamaConfig(**config_dict))
    return emb.inv_freq.numpy(), emb.attention_scaling


def _rope_params(kind: str, **extra) -> dict:
    return {**SCALINGS[kind], "rope_theta": 500000.0, **extra}


def _hf_dict(kind: str, **extra) -> dict:
    base = hf.hf_config_from(get_preset("tiny-llama"))
    base.pop("rope_theta")  # transformers 5 writes only rope_parameters
    return {**base, "hidden_size": 64, "num_attention_heads": 4, "head_dim": 16,
            "rope_parameters": _rope_params(kind, **extra)}


@pytest.mark.parametrize("case", [
    ("linear", {}), ("llama3", {}), ("yarn", {}),
    ("yarn", {"beta_fast": 16.0, "beta_slow": 2.0, "truncate": False}),
    ("yarn", {"attention_factor": 0.9}),
    ("yarn", {"mscale": 0.8, "mscale_all_dim": 0.5}),
], ids=["linear", "llama3", "yarn", "yarn-betas-untruncated", "yarn-attention", "yarn-mscale"])
def test_frequencies_match_transformers(case):
    """Ours within one float32 ulp of transformers' (its float32 pow is not correctly rounded;
    ours is), the cos/sin multiplier equal; read from transformers 5's and 4's forms alike."""
    kind, extra = case
    d = _hf_dict(kind, **extra)
    want, want_scale = _hf_rope(dict(d))
    cfg = hf.config_from_hf(d)
    legacy = {k: v for k, v in d.items() if k != "rope_parameters"}
    legacy_scaling = {k: v for k, v in d["rope_parameters"].items() if k != "rope_theta"}
    legacy_scaling["type"] = legacy_scaling.pop("rope_type")
    assert hf.config_from_hf({**legacy, "rope_theta": 500000.0,
                              "rope_scaling": legacy_scaling}) == cfg
    np.testing.assert_array_max_ulp(rope.inv_freq(cfg), want, maxulp=1)
    assert rope.attention_scaling(cfg) == pytest.approx(want_scale, rel=1e-15)
    # what we write back builds the same RoPE in transformers, from either of its two forms
    written = hf.hf_config_from(cfg)
    assert hf.config_from_hf(written) == cfg
    for form in ({k: v for k, v in written.items() if k != "rope_scaling"},
                 {k: v for k, v in written.items() if k != "rope_parameters"}):
        got, scale = _hf_rope(form)
        np.testing.assert_array_equal(got, want)
        assert scale == want_scale


def test_bands_are_all_exercised():
    """The tiny parity configs really leave, interpolate and scale frequencies."""
    for kind in ("llama3", "yarn"):
        cfg = hf.config_from_hf(_hf_dict(kind))
        plain = rope.inv_freq(cfg.replace(rope_scaling="none"))
        ratio = plain / rope.inv_freq(cfg)
        factor = cfg.rope_scaling_factor
        assert ratio[0] == 1 and 1.1 < ratio[1] < factor - 0.1, (kind, ratio)
        np.testing.assert_allclose(ratio[2:], factor, rtol=1e-6)


@pytest.mark.parametrize("name", [n for n, c in PRESETS.items() if c.rope_scaling != "none"])
def test_preset_frequencies_match_transformers(name):
    cfg = PRESETS[name]
    want, want_scale = _hf_rope(hf.hf_config_from(cfg))
    np.testing.assert_array_max_ulp(rope.inv_freq(cfg), want, maxulp=1)
    assert rope.attention_scaling(cfg) == want_scale


@pytest.fixture(scope="module")
def scaled_checkpoint(tmp_path_factory):
    """kind -> (directory, torch model): a tiny Llama-3-shaped model with that RoPE scaling."""
    made = {}

    def get(kind: str):
        if kind not in made:
            model = build_hf_model("llama", **SHAPE, rope_parameters=_rope_params(kind))
            directory = tmp_path_factory.mktemp(f"rope-{kind}")
            model.save_pretrained(directory)
            made[kind] = (directory, model)
        return made[kind]

    return get


@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_logits_match_transformers_beyond_original_context(scaled_checkpoint, kind, tmp_path):
    directory, torch_model = scaled_checkpoint(kind)
    model, params = hf.load(directory, dtype="float32")
    assert model.cfg.rope_scaling == kind and model.cfg.rope_theta == 500000.0
    ids, mask = padded_batch(model.cfg.vocab_size, SEQ, VALID)
    with torch.no_grad():
        want = torch_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    forward = jax.jit(lambda p, m, ids, mask: Transformer(m).apply({"params": p}, ids,
                                                                   attention_mask_BxL=mask),
                      static_argnums=1)
    got = np.asarray(forward(params, model.cfg, jnp.asarray(ids), jnp.asarray(mask)))
    diff = max(np.abs(got[0] - want[0]).max(), np.abs(got[1, :VALID] - want[1, :VALID]).max())
    assert diff <= TOL, diff
    assert np.abs(want).max() > 0.5
    # the scaling matters: plain RoPE gives other logits past the first positions
    plain = np.asarray(forward(params, model.cfg.replace(rope_scaling="none"),
                               jnp.asarray(ids[:1]), jnp.asarray(mask[:1])))
    assert np.abs(plain[0, ORIGINAL:] - got[0, ORIGINAL:]).max() > 100 * TOL
    # exported, transformers rebuilds the very same model (config.json's RoPE included)
    hf.save(tmp_path / "out", model, params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                                 attn_implementation="eager")
    with torch.no_grad():
        assert torch.equal(reloaded(torch.tensor(ids)).logits, torch_model(torch.tensor(ids)).logits)


def test_greedy_decoding_with_cache_matches_transformers(tmp_path):
    """Prompts near the pretraining context, so cached decoding runs past it."""
    torch_model = build_hf_model("llama", seed=1, **SHAPE, initializer_range=0.3,
                                 rope_parameters=_rope_params("llama3"))
    torch_model.save_pretrained(tmp_path)
    model, params = hf.load(tmp_path, dtype="float32")
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 128, n).tolist() for n in (ORIGINAL - 6, ORIGINAL - 15)]
    new_tokens = 16
    expected = []
    for p in prompts:
        with torch.no_grad():
            seq = torch_model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p),
                                       dtype=torch.long), max_new_tokens=new_tokens,
                                       do_sample=False, eos_token_id=None, pad_token_id=0)
        expected.append(seq[0, len(p):].tolist())
    got = generate_ids(model, params, prompts, eos_token_ids=[], max_new_tokens=new_tokens,
                       max_length=128, batch_size=2)
    assert got == expected
    assert all(len(a) == new_tokens for a in got)


@pytest.mark.parametrize("rope_fields,match", [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     r"unsupported rope_scaling.rope_type='dynamic'"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0],
                          "long_factor": [2.0]}},
     r"unsupported rope_parameters.rope_type='longrope'"),
    ({"rope_parameters": {**SCALINGS["llama3"], "rope_theta": 1e4, "beta_fast": 2}},
     r"unsupported rope_parameters keys \['beta_fast'\] for rope_type='llama3'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}},
     r"rope_parameters with rope_type='llama3' needs \['low_freq_factor', 'high_freq_factor'\]"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "factor": 2.0}},
     r"unsupported rope_parameters keys \['factor'\]"),
    ({"rope_parameters": {**SCALINGS["linear"], "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     r"unsupported rope_parameters.partial_rotary_factor=0.5"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0},
      "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}},
     r"rope_scaling=.* and rope_parameters=.* describe different RoPE"),
    ({"rope_theta": 5e5}, r"rope_theta is given as several values \[10000.0, 500000.0\]"),
    ({"rope_parameters": {**SCALINGS["yarn"], "rope_theta": 1e4, "attention_factor": 0.0}},
     r"unsupported rope_parameters.attention_factor=0.0"),
    ({"rope_parameters": {**SCALINGS["linear"], "rope_theta": 1e4, "factor": 0.5}},
     r"rope_scaling_factor \(0.5\) must be >= 1"),
    ({"rope_parameters": {**SCALINGS["llama3"], "rope_theta": 1e4, "low_freq_factor": 4.0,
                          "high_freq_factor": 1.0}},
     r"rope_scaling_low_freq_factor \(4.0\) must be > 0 and below rope_scaling_high_freq_factor"),
])
def test_unsupported_rope_refused(rope_fields, match):
    d = {**hf.hf_config_from(get_preset("tiny-llama")), **rope_fields}
    with pytest.raises(CheckpointError, match=r"^x/config.json: .*" + match):
        hf.config_from_hf(d, source="x/config.json")
