"""The jitted step on 8 fake CPU devices: mesh invariance, sharding, accumulation, masking, fitting."""

import jax
import numpy as np
import optax
import pytest

from phased_jax.train import build_trainer
from tests.train.helpers import fixed_batch, tiny_config

MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2), (1, 1, 8)]
# f32 on different meshes only reorders sums: losses agree to ~1e-7 relative. With Adam's eps
# at 1e-3 an update is proportional to its gradient (eps=1e-8 would turn a gradient that is
# float noise into a full +-lr step), so after 3 steps of at most ~lr each, a noise-level
# difference stays far below 1e-4 * lr * 3, while one wrong update is ~lr.
LR, STEPS = 1e-3, 3
LOSS_RTOL, PARAM_ATOL = 1e-5, 1e-4 * LR * STEPS


def run_three_steps(mesh_shape, params=None):
    config = tiny_config(mesh_shape, lr=LR)
    config.train.eps = 1e-3
    trainer = build_trainer(config)
    state = trainer.init_state(num_steps=STEPS, params=params)
    initial = jax.device_get(state.params)  # before the donated steps consume the state
    batch = trainer.shard_batch(fixed_batch())
    losses = []
    for _ in range(STEPS):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    return trainer, state, losses, initial


@pytest.fixture(scope="module")
def reference():
    """Random init directly sharded on (8, 1, 1); other meshes start from the same weights."""
    _, state, losses, initial = run_three_steps(MESHES[0])
    return jax.device_get(state.params), losses, initial


@pytest.mark.parametrize("mesh_shape", MESHES[1:])
def test_three_steps_agree_across_meshes(reference, mesh_shape):
    ref_params, ref_losses, initial = reference
    trainer, state, losses, _ = run_three_steps(mesh_shape, params=initial)
    np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
    assert losses[2] < losses[0]
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), state.params,
                         ref_params)
    assert max(jax.tree.leaves(diffs)) < PARAM_ATOL, diffs
    # parameters and Adam moments really are sharded as the rules say
    mesh = dict(trainer.mesh.shape)
    params = state.params
    assert params["lm_head"].sharding.spec == _spec(("fsdp", "tensor"), mesh)
    assert params["layers"]["mlp"]["wi"].sharding.spec == _spec((None, "fsdp", None, "tensor"), mesh)
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")
    assert mu["layers"]["attn"]["qkv"].sharding == params["layers"]["attn"]["qkv"].sharding
    head = params["lm_head"]
    assert head.addressable_shards[0].data.shape == (32 // mesh["fsdp"], 128 // mesh["tensor"])


def _spec(axes, mesh):
    from jax.sharding import PartitionSpec
    return PartitionSpec(*[a if a and mesh[a] > 1 else None for a in axes])


def test_grad_accumulation_equals_big_batch(reference):
    batch = fixed_batch()
    results = []
    for accum in (1, 4):
        # 2 batch shards: each micro-batch of 2 rows is split across both devices
        trainer = build_trainer(tiny_config((2, 1, 1), grad_accum=accum), devices=jax.devices()[:2])
        params = trainer.init_state(1, params=reference[2]).params
        grads, metrics = trainer.grads(params, trainer.shard_batch(batch))
        results.append((jax.device_get(grads), float(metrics["loss"])))
    (g1, l1), (g4, l4) = results
    assert l4 == pytest.approx(l1, rel=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-8)


def test_masked_tokens_contribute_exactly_zero_gradient(reference):
    trainer = build_trainer(tiny_config((2, 2, 2)))
    params = trainer.init_state(1, params=reference[2]).params
    batch = fixed_batch()
    grads, _ = trainer.grads(params, trainer.shard_batch(batch))
    perturbed = {k: v.copy() for k, v in batch.items()}
    rs = np.random.RandomState(1)
    off = perturbed["loss_mask"] == 0
    perturbed["targets"][off] = rs.randint(0, 128, off.sum())  # prompt and padding targets
    pad = perturbed["segment_ids"] == 0
    perturbed["input_ids"][pad] = rs.randint(0, 128, pad.sum())  # padding inputs
    grads2, _ = trainer.grads(params, trainer.shard_batch(perturbed))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and the response targets do matter
    perturbed["targets"][~off] = (perturbed["targets"][~off] + 1) % 128
    grads3, _ = trainer.grads(params, trainer.shard_batch(perturbed))
    assert not np.allclose(np.asarray(grads3["lm_head"]), np.asarray(grads["lm_head"]))


def test_tiny_model_overfits_then_next_phase_starts_fresh(reference):
    trainer = build_trainer(tiny_config((1, 1, 1), lr=1e-2), devices=jax.devices()[:1])
    state = trainer.init_state(num_steps=60, params=reference[2])
    batch = trainer.shard_batch(fixed_batch())
    for _ in range(60):
        state, metrics = trainer.step(state, batch)
    # starts at ln(128) = 4.85 on random tokens; memorising 8 x 12 response tokens gets < 0.5
    assert float(metrics["loss"]) < 0.5

    kept = jax.device_get(state.params)
    nxt = trainer.init_state(num_steps=5, params=state.params)  # the next phase
    assert int(nxt.step) == 0
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(nxt.params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    mu = optax.tree_utils.tree_get(nxt.opt_state, "mu")
    assert all(float(np.abs(np.asarray(m)).max()) == 0 for m in jax.tree.leaves(mu))
    _, metrics = trainer.step(nxt, batch)
    assert float(metrics["lr"]) == pytest.approx(1e-2)  # constant schedule, restarted
