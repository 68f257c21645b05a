"""Tied embeddings in training, sharded on 8 fake CPU devices: the embedding's gradient carries
both its uses (lookup and head), the chunked loss equals the full one, and a step trains."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from phased_jax.train import build_trainer
from tests.train.helpers import fixed_batch, tiny_config

MESH = (2, 2, 2)  # data, fsdp, tensor: `vocab` and `embed` both sharded
# f32 gradients of the same maths summed in another order: agree to ~1e-6 of the largest.
RTOL = 1e-5


def _trainer(tied: bool, loss_chunk: int = 0):
    c = tiny_config(MESH)
    c.model.tie_word_embeddings = tied
    c.train.loss_chunk = loss_chunk
    return build_trainer(c)


@pytest.fixture(scope="module")
def tied_state():
    """(trainer, params, grads, loss) of the tied model at its random init."""
    trainer = _trainer(True)
    params = trainer.init_state(1).params
    grads, metrics = trainer.grads(params, trainer.shard_batch(fixed_batch()))
    return trainer, params, jax.device_get(grads), float(metrics["loss"])


def _close(got, want):
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * np.abs(want).max())


def test_embed_gradient_is_lookup_plus_head(tied_state):
    """Against an untied model whose head is set to embed.T: d/d embed (tied) equals
    d/d embed + (d/d lm_head).T of the untied one; every other gradient is the same."""
    _, params, grads, loss = tied_state
    assert "lm_head" not in params
    host = jax.device_get(params)
    untied = _trainer(False)
    u_params = untied.init_state(1, params=dict(host, lm_head=host["embed"].T)).params
    u_grads, u_metrics = untied.grads(u_params, untied.shard_batch(fixed_batch()))
    u_grads = jax.device_get(u_grads)
    assert float(u_metrics["loss"]) == pytest.approx(loss, rel=1e-6)
    head_part = u_grads["lm_head"].T
    _close(grads["embed"], u_grads["embed"] + head_part)
    # Both parts matter: dropping either would fail the check above by far more than RTOL.
    for part in (u_grads["embed"], head_part):
        assert np.abs(part).max() > 100 * RTOL * np.abs(grads["embed"]).max()
    for a, b in zip(jax.tree.leaves(grads["layers"]), jax.tree.leaves(u_grads["layers"]),
                    strict=True):
        _close(a, b)
    _close(grads["final_norm"]["scale"], u_grads["final_norm"]["scale"])


def test_chunked_loss_equals_full_loss(tied_state):
    trainer, params, grads, loss = tied_state
    chunked = _trainer(True, loss_chunk=5)  # 16 positions: chunks 5, 5, 5 and a ragged 1
    c_grads, c_metrics = chunked.grads(params, chunked.shard_batch(fixed_batch()))
    assert float(c_metrics["loss"]) == pytest.approx(loss, rel=1e-6)
    for a, b in zip(jax.tree.leaves(jax.device_get(c_grads)), jax.tree.leaves(grads), strict=True):
        _close(a, b)


def test_tied_step_trains_with_the_table_sharded(tied_state):
    trainer, params, _, _ = tied_state
    mesh = dict(trainer.mesh.shape)
    assert params["embed"].addressable_shards[0].data.shape == (
        128 // mesh["tensor"], 32 // mesh["fsdp"])  # vocab over tensor, embed over fsdp
    state = trainer.init_state(3, params=jax.device_get(params))
    batch = trainer.shard_batch(fixed_batch())
    losses = []
    for _ in range(3):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[2] < losses[0]
    assert set(state.params) == {"embed", "layers", "final_norm"}
