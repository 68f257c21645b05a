"""What decoding does differently on XLA's CPU backend, where it is the speed that counts.

On CPU, the layer scan slices each layer's weights and cache out of their stacks at every step,
and a slice there is a copy. So `UnrolledTransformer` runs the layers one after another, each
on its own weights (`unstack_layers`) and its own cache array (`per_layer_cache`): 1.2-1.3x
faster at batch 8 (58M Llama of benchmarks/generate.py, 2 cores). Elsewhere the split would
cost device memory the size of the layer weights, and the unrolled layers compile time, without
a measured gain. The compiler options below are the other CPU-only choice.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from phased_jax.model.attention import Mask
from phased_jax.model.cache import KVCache
from phased_jax.model.config import ModelConfig
from phased_jax.model.transformer import DecoderLayer, Transformer

Array = jax.Array


def unstack_by_default(unstack: bool | None) -> bool:
    """Whether to decode by `UnrolledTransformer`: as asked, or (None) on the CPU backend."""
    return jax.default_backend() == "cpu" if unstack is None else unstack


class UnrolledTransformer(Transformer):
    """`Transformer` decoding layer by layer, for params from `unstack_layers` and a cache from
    `per_layer_cache`; training and `init` need the plain `Transformer` and stacked params."""

    def decode_layers(self, x_BxLxD: Array, cos: Array, sin: Array, mask: Mask,
                      cache: KVCache) -> tuple[Array, tuple[Array, ...], tuple[Array, ...]]:
        layer_params = self.variables["params"]["layers"]
        if not isinstance(layer_params, (tuple, list)) or not isinstance(cache.k, tuple):
            raise ValueError("UnrolledTransformer decodes with params from unstack_layers and a "
                             "cache from per_layer_cache")
        new_k, new_v = [], []
        for params_i, k_i, v_i in zip(layer_params, cache.k, cache.v, strict=True):
            (x_BxLxD, k_i, v_i), _ = DecoderLayer(self.cfg, self.lora, parent=None).apply(
                {"params": params_i}, (x_BxLxD, k_i, v_i), cos, sin, mask, cache.index, None)
            new_k.append(k_i)
            new_v.append(v_i)
        return x_BxLxD, tuple(new_k), tuple(new_v)


def per_layer_cache(cfg: ModelConfig, batch: int, slots: int, dtype: Any = None) -> KVCache:
    """An empty `KVCache` whose k and v are one [batch, kv_heads, slots, head_dim] array a
    layer: each layer's attention reads its cache where it lies, not sliced out of a stack."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (batch, cfg.num_kv_heads, slots, cfg.head_dim)
    return KVCache.empty(cfg, batch, slots, dtype).replace(  # under jit its stack is never built
        k=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
        v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)))


def unstack_layers(params: Any) -> dict:
    """params with the stacked `layers` split into a tuple of per-layer trees.

    Outside `jit`, a stack held whole in one CPU device's memory is split into views of it,
    without a copy (fresh copies of every layer cost more than 0.1 s for a 58M model, mostly in
    page faults); otherwise the split copies the weights once (so they are held twice while it
    lives).
    """
    stacked = nn.meta.unbox(params["layers"])
    leaves, treedef = jax.tree.flatten(stacked)
    n = leaves[0].shape[0]
    split = [layer_views(a) or tuple(a[i] for i in range(n)) for a in leaves]
    layers = tuple(jax.tree.unflatten(treedef, [s[i] for s in split]) for i in range(n))
    return {**params, "layers": layers}


def layer_views(a: Any) -> tuple[Array, ...] | None:
    """Arrays over each a[i]'s memory, if `a` is a concrete array on one CPU device, else None.

    `device_put` of a host view aliases it on the CPU backend (a copy where it cannot, e.g. for
    misaligned memory); the views keep `a`'s buffer alive. Each view gets `layer_sharding`: a
    stack placed on a one-device mesh has a rank-n spec that no rank n-1 layer can take.
    """
    if (isinstance(a, jax.core.Tracer) or not isinstance(a, jax.Array)
            or len(a.devices()) != 1 or next(iter(a.devices())).platform != "cpu"):
        return None
    host = np.asarray(a)  # a view of the device buffer on the CPU backend
    sharding = layer_sharding(a.sharding)
    return tuple(jax.device_put(host[i], sharding) for i in range(a.shape[0]))


def layer_sharding(stacked: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of one layer sliced out of a stack placed by `stacked`: a `NamedSharding`
    less its leading (layers) axis, keeping the mesh; any other kind unchanged (its placement
    does not depend on rank)."""
    if isinstance(stacked, jax.sharding.NamedSharding):
        spec = tuple(stacked.spec)[1:]
        return jax.sharding.NamedSharding(stacked.mesh, jax.sharding.PartitionSpec(*spec),
                                          memory_kind=stacked.memory_kind)
    return stacked


# XLA's CPU backend gives dots to YNNPACK by default. A decode step's matmuls have only `batch`
# rows, and for those Eigen's (the option's empty list) were 1.2-1.4x faster a step at batch 8
# and level at batch 1 (58M Llama of benchmarks/generate.py, 2 cores); tokens are unchanged.
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def compiler_options() -> dict[str, str]:
    """Options for jitting a decoder: `_CPU_OPTIONS` on the CPU backend if this jaxlib knows
    them; none elsewhere."""
    if jax.default_backend() != "cpu":
        return {}
    try:
        jax.jit(jnp.sin, compiler_options=_CPU_OPTIONS).lower(jnp.ones(2)).compile()
    except jax.errors.JaxRuntimeError:  # an option this jaxlib lacks: keep its defaults
        return {}
    return dict(_CPU_OPTIONS)
