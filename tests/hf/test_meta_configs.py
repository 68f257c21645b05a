"""Meta's published `config.json` files (as on the Hub, transformers 4 style) load as our presets,
and what we write back rebuilds the same model in transformers."""

from __future__ import annotations

import dataclasses

import pytest

from phased_jax.hf import config_from_hf, hf_config_from
from phased_jax.model.config import PRESETS

_COMMON = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
    "initializer_range": 0.02, "mlp_bias": False, "model_type": "llama", "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 128256,
}
_LLAMA31_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192, "rope_type": "llama3"}
META = {
    "llama3-8b": {**_COMMON, "hidden_size": 4096, "intermediate_size": 14336,
                  "max_position_embeddings": 8192, "num_attention_heads": 32,
                  "num_hidden_layers": 32, "num_key_value_heads": 8, "rope_scaling": None,
                  "tie_word_embeddings": False},
    "llama3.1-70b": {**_COMMON, "hidden_size": 8192, "intermediate_size": 28672,
                     "max_position_embeddings": 131072, "num_attention_heads": 64,
                     "num_hidden_layers": 80, "num_key_value_heads": 8,
                     "rope_scaling": _LLAMA31_SCALING, "tie_word_embeddings": False},
    "llama3.2-1b": {**_COMMON, "head_dim": 64, "hidden_size": 2048, "intermediate_size": 8192,
                    "max_position_embeddings": 131072, "num_attention_heads": 32,
                    "num_hidden_layers": 16, "num_key_value_heads": 8,
                    "rope_scaling": {**_LLAMA31_SCALING, "factor": 32.0},
                    "tie_word_embeddings": True},
}
# Not in Meta's files: the pad id (Llama-3 has none; the preset pads with <|end_of_text|>,
# a loaded checkpoint with 0 — padding is masked either way) and the precision.
_IGNORED = {"pad_token_id", "dtype", "param_dtype"}


@pytest.mark.parametrize("name", sorted(META))
def test_meta_config_loads_as_the_preset(name):
    got, want = config_from_hf(META[name]), PRESETS[name]
    diff = {f.name: (getattr(got, f.name), getattr(want, f.name))
            for f in dataclasses.fields(want)
            if f.name not in _IGNORED and getattr(got, f.name) != getattr(want, f.name)}
    assert diff == {}
    assert got.param_dtype == "bfloat16"


def test_written_config_rebuilds_the_same_rope_in_transformers():
    transformers = pytest.importorskip("transformers")
    import numpy as np

    from phased_jax.model.rope import inv_freq

    cfg = config_from_hf(META["llama3.2-1b"])
    d = hf_config_from(cfg)
    assert d["tie_word_embeddings"] is True and d["rope_scaling"]["rope_type"] == "llama3"
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in d.items()
                                         if k not in ("architectures", "model_type")})
    init = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"]
    want = init(hf_cfg, "cpu")[0].numpy()
    got = inv_freq(cfg)
    # the same float32 operations; pow may differ by an ulp (see phased_jax.model.rope)
    np.testing.assert_allclose(got, want, rtol=2 * np.finfo(np.float32).eps, atol=0)
    plain = inv_freq(cfg.replace(rope_scaling="none", rope_scaling_factor=1.0))
    assert got[0] == plain[0]  # high frequencies are kept
    np.testing.assert_allclose(got[-1], plain[-1] / 32, rtol=1e-6)  # low ones divided by 32
