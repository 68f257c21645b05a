"""Every attention implementation gives the reference's logits, and decoding with a KV cache
(the model's layer scan and generate's per-layer path) gives a full forward pass's logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phased_jax.generate import cpu
from phased_jax.model.attention import attend, make_mask, resolve_attention_impl
from phased_jax.model.cache import KVCache
from phased_jax.model.config import ATTENTION_IMPLS
from phased_jax.model.transformer import Transformer
from tests.train.helpers import fixed_batch

from .helpers import rounding_bound, tiny_model

REFERENCE = "xla"
# cuDNN runs on GPUs only; auto is xla on CPU (its resolution: test_splash.py)
CPU_IMPLS = [n for n in ATTENTION_IMPLS if n not in ("cudnn", "auto")]
ARCHS = ["llama", "mistral"]  # Mistral: rows of 16 tokens, twice its window


def forward(model, params, batch) -> np.ndarray:
    return np.asarray(jax.jit(model.apply)({"params": params}, batch["input_ids"],
                                           positions_BxL=batch["positions"],
                                           segment_ids_BxL=batch["segment_ids"]))


@pytest.mark.parametrize("impl", [n for n in CPU_IMPLS if n != REFERENCE])
@pytest.mark.parametrize("arch", ARCHS)
def test_implementation_gives_the_reference_logits(arch, impl):
    batch = fixed_batch()  # packed and padded rows
    ref_model, params = tiny_model(arch, attention_impl=REFERENCE)
    model, _ = tiny_model(arch, attention_impl=impl)
    want, got = forward(ref_model, params, batch), forward(model, params, batch)
    real = batch["segment_ids"] != 0  # a pad query sees nothing: its output is arbitrary
    assert np.abs(got - want)[real].max() <= rounding_bound(want, model.cfg)
    assert np.abs(want).max() > 1  # logits far from uniform: a wrong mask would show


def test_attend_knows_every_configured_name():
    q = jnp.ones((1, 2, 1, 2, 4))
    kv = jnp.ones((1, 2, 1, 4))
    pos, seg = jnp.arange(2)[None], jnp.ones((1, 2), jnp.int32)
    for name in ATTENTION_IMPLS:
        impl = resolve_attention_impl(name, "cpu", strict=False)  # cudnn: xla, with a warning
        mask = make_mask(pos, seg, pos, seg, sliding_window=0, implementation=impl,
                         self_attention=True)
        assert attend(q, kv, kv, mask).shape == q.shape


def decode_one_by_one(model: Transformer, params, ids_BxL: np.ndarray, prefill: int,
                      unrolled: bool) -> np.ndarray:
    """Logits [B, L, V] from a prefill of `prefill` tokens, then one token a step."""
    B, L = ids_BxL.shape
    if unrolled:
        model, params = cpu.UnrolledTransformer(model.cfg), cpu.unstack_layers(params)
        cache = cpu.per_layer_cache(model.cfg, B, L)
    else:
        cache = KVCache.empty(model.cfg, B, L)

    @jax.jit
    def step(cache, ids, start):
        positions = jnp.broadcast_to(start + jnp.arange(ids.shape[1]), ids.shape)
        return model.apply({"params": params}, ids, positions_BxL=positions, cache=cache)

    logits, cache = step(cache, ids_BxL[:, :prefill], 0)
    out = [np.asarray(logits)]
    for t in range(prefill, L):
        logits, cache = step(cache, ids_BxL[:, t:t + 1], t)
        out.append(np.asarray(logits))
    assert int(cache.index) == L
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("unrolled", [False, True], ids=["layer-scan", "per-layer"])
@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decoding_gives_the_full_forward_logits(arch, impl, unrolled):
    model, params = tiny_model(arch, attention_impl=impl)
    ids_BxL = fixed_batch()["input_ids"][:2]
    want = np.asarray(jax.jit(model.apply)({"params": params}, ids_BxL))
    got = decode_one_by_one(model, params, ids_BxL, prefill=5, unrolled=unrolled)
    assert np.abs(got - want).max() <= rounding_bound(want, model.cfg)
