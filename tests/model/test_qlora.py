"""QLoRA: a base stored as int8 or NF4 codes. The quantisation's error bound, numpy and jax
quantising alike, the loss against the unquantised base within a bound derived from that error,
and the compiled step really taking the codes (its argument bytes)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phased_jax.config import get_default_config
from phased_jax.model import Transformer
from phased_jax.model.config import PRESETS
from phased_jax.model.lora import LoraSpec, join, split
from phased_jax.model.params import init_params
from phased_jax.model.quant import (
    BLOCK,
    BLOCK_AXIS,
    QUANTISED,
    block_size,
    check_divisible,
    dequantize,
    error_bound,
    quantize,
    quantize_tree,
)
from phased_jax.train.trainer import Trainer

CFG = PRESETS["tiny-llama"].replace(intermediate_size=128)  # block axes multiples of 64
QTYPES = ("int8", "nf4")


@pytest.fixture(scope="module")
def base():
    return split(init_params(CFG, jax.random.key(0)))[0]


@pytest.mark.parametrize("qtype", QTYPES)
def test_roundtrip_error_within_bound_and_numpy_equals_jax(qtype):
    w = np.random.RandomState(0).standard_t(4, size=(3, 128, 2, 96)).astype(np.float32)
    codes, absmax = quantize(w, qtype, axis=1)
    jcodes, jabsmax = quantize(jnp.asarray(w), qtype, axis=1)
    np.testing.assert_array_equal(codes, np.asarray(jcodes))
    np.testing.assert_array_equal(absmax, np.asarray(jabsmax))
    assert codes.dtype == {"int8": np.int8, "nf4": np.uint8}[qtype]
    assert codes.nbytes == w.size // (1 if qtype == "int8" else 2)
    assert absmax.shape == (3, 128 // BLOCK, 2, 96)
    back = np.asarray(dequantize(jnp.asarray(codes), jnp.asarray(absmax), qtype, 1, jnp.float32))
    per_block = np.repeat(absmax, BLOCK, axis=1)
    err = np.abs(back - w)
    assert np.all(err <= error_bound(qtype) * per_block * (1 + 1e-6))
    assert err.max() > 0.1 * error_bound(qtype) * per_block.max(), "it really rounds"
    # each block's largest value is stored exactly (its level is +-1)
    np.testing.assert_allclose(np.abs(back).max(axis=1), np.abs(w).max(axis=1), rtol=1e-6)


@pytest.mark.parametrize("qtype", QTYPES)
def test_an_axis_not_a_multiple_of_64_takes_smaller_blocks(qtype):
    """tiny-llama's MLP width 176 = 11 x 16: blocks of 16, the scales' shape saying so."""
    w = np.random.RandomState(2).normal(size=(2, 176, 8)).astype(np.float32)
    codes, absmax = quantize(w, qtype, axis=1)
    assert absmax.shape == (2, 11, 8) and block_size(176) == 16
    back = np.asarray(dequantize(jnp.asarray(codes), jnp.asarray(absmax), qtype, 1, jnp.float32))
    assert np.all(np.abs(back - w) <= error_bound(qtype) * np.repeat(absmax, 16, axis=1)
                  * (1 + 1e-6))
    assert check_divisible("model.intermediate_size", 176, qtype) is None
    assert "not a multiple of 16" in check_divisible("model.intermediate_size", 180, qtype)


def _loss(model, params, ids, weights):
    logits = model.apply({"params": params}, ids)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -(jnp.take_along_axis(logp, ids[..., None], -1)[..., 0] * weights).sum() / weights.sum()


@pytest.fixture(scope="module")
def unquantised(base):
    """(ids, weights, adapters, loss and its gradient wrt the base): the unquantised side."""
    rng = np.random.RandomState(1)
    ids = jnp.asarray(rng.randint(3, CFG.vocab_size, size=(4, 16)))
    weights = jnp.ones((4, 16), jnp.float32)
    spec = LoraSpec(4, 8.0)
    adapters = nn.meta.unbox(split(jax.jit(Transformer(CFG, lora=spec).init)(
        jax.random.key(1), ids)["params"])[1])
    adapters = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.05, a.shape), a.dtype),
                            adapters)
    plain = Transformer(CFG, lora=spec)
    loss, grads = jax.jit(jax.value_and_grad(
        lambda b: _loss(plain, join(b, adapters), ids, weights)))(base)
    return ids, weights, adapters, loss, grads


@pytest.mark.parametrize("qtype", QTYPES)
def test_loss_within_first_order_bound_of_the_quantisation_error(base, unquantised, qtype):
    """|L(W_q) - L(W)| <= sum_i |dL/dW_i| * e_i, e_i = error_bound * absmax of i's block: the
    first-order bound of the quantisation error (times 1.5 for the second-order rest, which at
    this error is far smaller)."""
    ids, weights, adapters, loss, grads = unquantised
    qbase = quantize_tree(base, qtype)
    quantised = Transformer(CFG, lora=LoraSpec(4, 8.0, base_qtype=qtype))
    qloss = jax.jit(lambda b: _loss(quantised, join(b, adapters), ids, weights))(qbase)
    bound = 0.0
    for module in ("attn", "mlp"):
        for name in QUANTISED:
            if name not in base["layers"][module]:
                continue
            absmax = qbase["layers"][module][f"{name}_absmax"]
            e = error_bound(qtype) * np.repeat(np.asarray(absmax), BLOCK, axis=BLOCK_AXIS[name])
            bound += float(np.sum(np.abs(np.asarray(grads["layers"][module][name])) * e))
    diff = abs(float(qloss) - float(loss))
    assert diff <= 1.5 * bound, (diff, bound)
    assert diff > 0, "the quantised base changes the loss"


@pytest.mark.parametrize("qtype", QTYPES)
def test_compiled_step_takes_the_codes(base, qtype):
    """The train step's compiled argument bytes: the quantised projections' codes and scales
    instead of their float32 weights (one device, so no sharding divides them)."""
    sizes = {q: _argument_bytes(q) for q in ("", qtype)}
    n = sum(int(np.prod(base["layers"][m][k].shape)) for m in ("attn", "mlp")
            for k in QUANTISED if k in base["layers"][m])
    per_param = {"int8": 1 + 4 / BLOCK, "nf4": 0.5 + 4 / BLOCK}[qtype]
    assert sizes[""] - sizes[qtype] == pytest.approx(n * (4 - per_param), rel=1e-3), sizes


@functools.cache
def _argument_bytes(qtype: str) -> int:
    """The compiled train step's argument bytes, one device (so no sharding divides them)."""
    config = get_default_config()
    config.train.global_batch = 2
    trainer = Trainer(CFG, config.train, config.mesh, devices=jax.devices()[:1],
                      lora=LoraSpec(4, 8.0, base_qtype=qtype))
    return trainer.lower("train", 16).compile().memory_analysis().argument_size_in_bytes
