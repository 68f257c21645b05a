"""The decode cache: every layer's keys and values, and the one way a layer writes into it.

A forward pass given a `KVCache` writes its keys and values into it and attends over every slot
written so far (`Transformer.__call__`); how a decoder batches and loops is `phased_jax.generate`.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from phased_jax.model.config import ModelConfig

Array = jax.Array


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for decoding, plus what the mask needs to know of each slot.

    k and v keep kv_heads before slots, a layout XLA's dots read without a copy; the layer scan
    carries both whole and each layer writes only its own slice at the current slot
    (`write_cache`, in place), so a decode step copies no cache.
    """

    k: Any  # [layers, batch, kv_heads, slots, head_dim]; a `Transformer.decode_layers`
    v: Any  # override may hold them otherwise (a tuple of one [batch, ...] array per layer)
    positions: Array  # [batch, slots] int32
    segment_ids: Array  # [batch, slots] int32, 0 where nothing is written yet
    index: Array  # scalar int32: the next slot to write

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, slots: int, dtype: Any = None) -> KVCache:
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, slots, cfg.head_dim)
        k = v = jnp.zeros(shape, jnp.dtype(dtype or cfg.dtype))
        return cls(k=k, v=v, positions=jnp.zeros((batch, slots), jnp.int32),
                   segment_ids=jnp.zeros((batch, slots), jnp.int32), index=jnp.zeros((), jnp.int32))


def write_cache(cache: Array, new_BxLxKxH: Array, layer: tuple[Array, ...], index: Array
                ) -> tuple[Array, Array]:
    """The cache with `new` written from slot `index` on (in place under XLA), and the layer's
    whole cache seen as [B, S, K, H] for attention. `layer` indexes the cache's leading axes:
    (i,) in a stack [layers, B, K, S, H], () in one layer's own cache [B, K, S, H]."""
    new_BxKxLxH = new_BxLxKxH.swapaxes(1, 2).astype(cache.dtype)
    new_BxKxLxH = new_BxKxLxH.reshape((1,) * len(layer) + new_BxKxLxH.shape)
    cache = jax.lax.dynamic_update_slice(cache, new_BxKxLxH, (*layer, 0, 0, index, 0))
    layer_BxKxSxH = cache
    for i in layer:
        layer_BxKxSxH = jax.lax.dynamic_index_in_dim(layer_BxKxSxH, i, 0, keepdims=False)
    return cache, layer_BxKxSxH.swapaxes(1, 2)
