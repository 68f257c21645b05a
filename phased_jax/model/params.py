"""The model's parameters as shapes and logical axis names, without allocating any of them.

The one source of both for everything that places or converts parameters: the trainer's and
the decoder's shardings, the planner's per-device bytes, the HF mapping's checks.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from phased_jax.model.config import ModelConfig
from phased_jax.model.lora import LoraSpec
from phased_jax.model.transformer import Transformer


def boxed_abstract_params(cfg: ModelConfig, lora: LoraSpec | None = None) -> Any:
    """ShapeDtypeStructs of every parameter, each in its `nn.LogicallyPartitioned` box (with
    `lora`, the adapters' too: `lora.split` cuts them out)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda rng: Transformer(cfg, lora=lora).init(rng, ids)["params"],
                          jax.random.key(0))


def abstract_params(cfg: ModelConfig, lora: LoraSpec | None = None) -> Any:
    """ShapeDtypeStructs of every parameter (a plain pytree, as the trainer holds params)."""
    return nn.meta.unbox(boxed_abstract_params(cfg, lora))


def logical_axes(cfg: ModelConfig, lora: LoraSpec | None = None) -> Any:
    """Each parameter's logical axis names, as a tree of PartitionSpecs."""
    return nn.get_partition_spec(boxed_abstract_params(cfg, lora))


def init_params(cfg: ModelConfig, rng: jax.Array) -> Any:
    """Freshly initialised params on the default device (a plain pytree): for small models
    written whole, e.g. `phased-jax convert --random`; training inits them sharded."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return nn.meta.unbox(jax.jit(lambda r: Transformer(cfg).init(r, ids)["params"])(rng))
