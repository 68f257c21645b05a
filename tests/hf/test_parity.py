"""Logits of checkpoints loaded through phased_jax.hf.load match transformers' PyTorch models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import phased_jax.hf as hf
from phased_jax.model.transformer import Transformer

from .helpers import padded_batch

TOL = 1e-4  # max |logit difference| allowed, float32 on CPU
SEQ, VALID = 40, 23  # row 1 is right-padded after VALID tokens
WINDOW = 8


@pytest.mark.parametrize("case", ["llama-gqa", "llama-mha-theta-eps", "mistral-window"])
def test_logits_match_transformers(hf_checkpoint, case):
    directory, torch_model = hf_checkpoint(case)
    model, params = hf.load(directory, dtype="float32")
    ids, mask = padded_batch(model.cfg.vocab_size, SEQ, VALID)
    with torch.no_grad():
        want = torch_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids),
                                          attention_mask_BxL=jnp.asarray(mask)))
    assert got.shape == (2, SEQ, model.cfg.vocab_size)
    assert np.abs(got[0] - want[0]).max() <= TOL
    assert np.abs(got[1, :VALID] - want[1, :VALID]).max() <= TOL  # valid positions only
    assert np.abs(want).max() > 0.5  # logits large enough that a wrong mapping would show

    if case == "llama-mha-theta-eps":  # the non-default fields really arrived
        assert (model.cfg.rope_theta, model.cfg.rms_norm_eps) == (50.0, 1e-3)
        assert model.cfg.num_kv_heads == model.cfg.num_heads
    if case == "mistral-window":  # the window is exercised: without it late logits change
        assert model.cfg.sliding_window == WINDOW
        full = Transformer(model.cfg.replace(sliding_window=0))
        no_window = np.asarray(jax.jit(full.apply)({"params": params}, jnp.asarray(ids[:1])))
        assert np.abs(no_window[0, :WINDOW] - got[0, :WINDOW]).max() <= TOL
        assert np.abs(no_window[0, WINDOW + 4:] - got[0, WINDOW + 4:]).max() > 100 * TOL
