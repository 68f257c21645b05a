"""Adapter dropout (PEFT's `lora_dropout`): on the adapters' input while training only, its
masks a function of the key (so a resumed step draws the same)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from phased_jax.model import Transformer
from phased_jax.model.config import PRESETS
from phased_jax.model.lora import LoraSpec

CFG = PRESETS["tiny-llama"]


def test_dropout_acts_in_training_only_and_follows_the_key():
    spec = LoraSpec(4, 8.0, dropout=0.5)
    ids = jnp.asarray(np.random.RandomState(0).randint(3, CFG.vocab_size, size=(2, 8)))
    params = nn.meta.unbox(jax.jit(Transformer(CFG, lora=spec).init)(jax.random.key(0), ids)
                           ["params"])
    # B random (PEFT starts it at zero, where dropout would change nothing)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: (jax.random.normal(jax.random.key(1), x.shape) * 0.1
                      if str(p[-1].key) == "b" else x), params)
    evaluating = jax.jit(Transformer(CFG, lora=spec).apply)({"params": params}, ids)
    training = jax.jit(lambda key: Transformer(CFG, lora=spec, train=True).apply(
        {"params": params}, ids, rngs={"dropout": key}))

    def run(seed):
        return training(jax.random.key(seed))

    np.testing.assert_array_equal(run(3), run(3))
    assert np.abs(run(3) - run(4)).max() > 1e-3
    assert np.abs(run(3) - evaluating).max() > 1e-3
