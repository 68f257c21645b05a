"""A ~170 MB float32 model whose params any process (or sharding) builds identically.

Values come from `jax.random` with partitionable threefry, generated on the devices in the
requested sharding, so no host ever materialises a whole leaf and a 1-process and a 2-process
build give the same bits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from phased_jax.hf import mapping
from phased_jax.model.config import ModelConfig
from phased_jax.model.params import abstract_params

CFG = ModelConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_layers=12,
                  num_heads=8, num_kv_heads=4)

# Leaves spread over the mesh's "fsdp" axis (a layer-sharded `wo` takes the static-slice path).
SPECS = {
    ("embed",): P("fsdp"),
    ("layers", "attn_norm", "scale"): P(None, "fsdp"),
    ("layers", "attn", "qkv"): P(None, "fsdp"),
    ("layers", "attn", "o"): P(None, "fsdp"),
    ("layers", "mlp_norm", "scale"): P(None, "fsdp"),
    ("layers", "mlp", "wi"): P(None, None, None, "fsdp"),
    ("layers", "mlp", "wo"): P("fsdp"),
    ("final_norm", "scale"): P(),
    ("lm_head",): P(None, "fsdp"),
}


def model_bytes() -> int:
    abstract = abstract_params(CFG)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))


def make_params(mesh: Mesh | None) -> dict:
    """The params, sharded over `mesh` ("fsdp" axis), or on one device if None."""
    abstract = abstract_params(CFG)
    params: dict = {}
    for k, rule in enumerate(mapping.rules(CFG)):
        shape = mapping.get_path(abstract, rule.path).shape
        sharding = None if mesh is None else NamedSharding(mesh, SPECS[rule.path])

        def build(k=k, shape=shape):
            return jax.random.uniform(jax.random.key(k), shape, jnp.float32, -1.0, 1.0)

        mapping.set_path(params, rule.path, jax.jit(build, out_shardings=sharding)())
    return params
