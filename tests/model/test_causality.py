"""A position's loss depends on no later token, on no token of another packed example, and on
no token beyond the reach of Mistral's sliding window; and it does depend on those it may see."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phased_jax.model.config import ATTENTION_IMPLS

from .helpers import VOCAB, tiny_model

SEQ = 24  # three of Mistral's windows of 8


def influence(model, params, segment_ids_L=None, positions_L=None) -> np.ndarray:
    """[L, L]: max |d loss_t / d embedding of the token at s| for query t, key s.

    The ids are distinct, so each position owns one row of the embedding table."""
    ids_L = np.random.default_rng(0).permutation(np.arange(3, VOCAB))[:SEQ].astype(np.int32)

    def losses_L(table):
        logits = model.apply({"params": {**params, "embed": table}}, jnp.asarray(ids_L)[None],
                             positions_BxL=None if positions_L is None else positions_L[None],
                             segment_ids_BxL=None if segment_ids_L is None else segment_ids_L[None])
        return -jax.nn.log_softmax(logits[0], axis=-1)[:, 0]

    jac_LxVxD = jax.jit(jax.jacrev(losses_L))(params["embed"])
    return np.abs(np.asarray(jac_LxVxD)[:, ids_L]).max(axis=-1)


@pytest.mark.parametrize("impl", [n for n in ATTENTION_IMPLS if n not in ("cudnn", "auto")])
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_a_position_sees_no_later_token(arch, impl):
    model, params = tiny_model(arch, attention_impl=impl)
    cfg = model.cfg
    # Each layer reaches window - 1 positions further back: beyond that Mistral sees nothing.
    reach = cfg.num_layers * (cfg.sliding_window - 1) if cfg.sliding_window else SEQ
    t, s = np.indices((SEQ, SEQ))
    visible = (s <= t) & (t - s <= reach)
    grads_LxL = influence(model, params)
    assert np.all(grads_LxL[~visible] == 0)  # exactly: masked scores get no gradient at all
    assert np.all(grads_LxL[visible] > 0)
    if cfg.sliding_window:  # the window really cut earlier tokens off
        assert np.any(~visible & (s < t))


def test_packed_examples_do_not_see_each_other():
    model, params = tiny_model("mistral")
    split = 10
    first = np.arange(SEQ) < split
    segments = np.where(first, 1, 2).astype(np.int32)
    positions = np.where(first, np.arange(SEQ), np.arange(SEQ) - split).astype(np.int32)
    grads_LxL = influence(model, params, segments, positions)
    assert np.all(grads_LxL[~first][:, first] == 0)  # the first example, though earlier
    assert np.all(grads_LxL[first][:, ~first] == 0)
    assert np.all(np.diag(grads_LxL) > 0)
