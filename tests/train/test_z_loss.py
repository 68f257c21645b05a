"""`train.z_loss`: the metric is z * mean(logsumexp^2) over response tokens, the CE is
unchanged, and the gradient is the CE gradient plus z * d mean(lse^2) (checked by finite
differences along the LM head, where the extra term lives)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from phased_jax.train import build_trainer
from tests.train.helpers import fixed_batch, tiny_config

Z = 0.5  # large, so the term is far above float32 noise


def _lse(trainer, params, batch) -> np.ndarray:
    logits = trainer.model.apply({"params": params}, batch["input_ids"],
                                 positions_BxL=batch["positions"],
                                 segment_ids_BxL=batch["segment_ids"])
    x = np.asarray(logits, np.float64)
    m = x.max(-1, keepdims=True)
    return (np.log(np.exp(x - m).sum(-1, keepdims=True)) + m)[..., 0]


def test_z_loss_metric_value_and_gradient():
    host = fixed_batch()
    runs = {}
    for z in (0.0, Z):
        config = tiny_config((1, 1, 1))
        config.train.z_loss = z
        trainer = build_trainer(config, devices=jax.devices()[:1])
        params = trainer.init_state(1).params
        grads, m = trainer.grads(params, trainer.shard_batch(host))
        runs[z] = (trainer, params, jax.device_get(grads), jax.device_get(m))
    trainer, params, g_z, m_z = runs[Z]
    _, _, g_0, m_0 = runs[0.0]

    mask = host["loss_mask"].astype(bool)
    lse = _lse(trainer, params, host)
    want = Z * float(np.mean(np.square(lse[mask])))
    assert float(m_z["z_loss"]) == pytest.approx(want, rel=1e-5)
    assert float(m_0["z_loss"]) == 0.0
    assert float(m_z["loss"]) == pytest.approx(float(m_0["loss"]), rel=1e-6)  # CE unchanged

    # d/dW of z * mean(lse^2) along one LM-head direction, by central differences in float64
    extra = np.asarray(g_z["lm_head"], np.float64) - np.asarray(g_0["lm_head"], np.float64)
    assert np.abs(extra).max() > 1e-3  # the term really moves the head
    rng = np.random.default_rng(0)
    direction = rng.standard_normal(extra.shape)
    direction /= np.linalg.norm(direction)
    eps = 1e-2
    head = np.asarray(params["lm_head"])
    values = []
    for sign in (1, -1):
        moved = dict(params, lm_head=(head + sign * eps * direction).astype(np.float32))
        values.append(Z * float(np.mean(np.square(_lse(trainer, moved, host)[mask]))))
    numeric = (values[0] - values[1]) / (2 * eps)
    assert float(np.sum(extra * direction)) == pytest.approx(numeric, rel=2e-2, abs=1e-5)
