"""Tiny random decoders for the model tests, and how far float32 rounding alone can move a result.

Sizes are those of the training tests (`tests/train/helpers.py`), whose `fixed_batch` (packed
and padded rows of 16 tokens, twice Mistral's window of 8) the tests share. Weights are drawn
wider than the presets' 0.02 so attention is far from uniform and a wrong mask shows.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from phased_jax.model.config import ModelConfig, get_preset
from phased_jax.model.transformer import Transformer

VOCAB = 128
U32 = 2.0 ** -24  # float32's unit roundoff


def tiny_model(arch: str, **overrides: Any) -> tuple[Transformer, Any]:
    """(model, params) of `tiny-llama` or `tiny-mistral` (2 layers, window 8), float32. The
    params are the same for every override that leaves the shapes alone (attention, remat)."""
    cfg = get_preset(f"tiny-{arch}", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                     initializer_range=0.2, dtype="float32", param_dtype="float32", **overrides)
    return Transformer(cfg), _params(cfg.replace(attention_impl="xla", remat_policy="none"))


@functools.cache
def _params(cfg: ModelConfig) -> Any:
    boxed = jax.jit(Transformer(cfg).init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    return nn.meta.unbox(boxed["params"])


def rounding_bound(reference: Any, cfg: ModelConfig) -> float:
    """The most two float32 evaluations of the same maths can differ by, scaled to `reference`.

    An evaluation that differs only in the order or blocking of its sums stays within n * U32
    of the exact value, relative to the magnitudes summed (Higham's bound for a sum of n terms),
    n at most the longest reduction here, the MLP width; two such evaluations differ by at most
    twice that. The largest |reference| stands in for the magnitudes summed.
    """
    n = max(cfg.hidden_size, cfg.intermediate_size)
    return 2 * n * U32 * float(np.max(np.abs(np.asarray(reference))))
