"""`train.loss_chunk`: the chunked LM head + loss gives the full loss and its gradients (z-loss,
response masks, padding, packed rows, ragged chunks, grad_accum), the model's hidden-state path
gives its logits bit for bit, the compiled step holds no [B, L, vocab] float32 array, and the
step counts the batch's non-padding tokens for useful throughput."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from phased_jax.config import model_config
from phased_jax.config_checks import validate_config
from phased_jax.errors import PhasedError
from phased_jax.model import Transformer
from phased_jax.model.transformer import lm_head_logits
from phased_jax.train import build_trainer
from tests.train.helpers import SEQ, fixed_batch, tiny_config

VOCAB = 128  # tiny_config's vocab_size
HLO_VOCAB = 160  # for the HLO check: no other dim or flattened [B x L] is 160
# float32 sums over <= 8 x 16 tokens in another order: relative differences of a few ulp
# (2**-23 ~ 1.2e-7) per summand, far inside 1e-6 of the norm.
RTOL = 1e-6


def _trainer(loss_chunk: int, z_loss: float = 0.0, grad_accum: int = 1, devices: int = 1,
             vocab: int = VOCAB):
    config = tiny_config((1, -1, 1) if devices == 1 else (1, -1, 2), grad_accum=grad_accum)
    config.train.update(loss_chunk=loss_chunk, z_loss=z_loss)
    config.model.vocab_size = vocab
    return build_trainer(config, devices=jax.devices()[:devices])


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("chunk,z_loss,grad_accum,devices", [
    (4, 0.0, 1, 1),  # divides L
    (5, 0.5, 2, 1),  # z-loss, ragged last chunk (16 = 3 x 5 + 1), micro-batches
    (8, 0.5, 2, 4),  # z-loss, sharded (fsdp 2 x tensor 2: vocab-sharded logits), micro-batches
])
def test_chunked_loss_and_grads_equal_full(chunk, z_loss, grad_accum, devices):
    host = fixed_batch()
    full, chunked = (_trainer(c, z_loss, grad_accum, devices) for c in (0, chunk))
    params = full.init_state(1).params
    g_full, m_full = jax.device_get(full.grads(params, full.shard_batch(host)))
    g_chunk, m_chunk = jax.device_get(chunked.grads(params, chunked.shard_batch(host)))
    for key in ("loss", "z_loss"):
        assert float(m_chunk[key]) == pytest.approx(float(m_full[key]), rel=RTOL, abs=1e-30)
    assert (float(m_full["z_loss"]) > 0) == (z_loss > 0)
    # the step counts the non-padding tokens (row 1 ends in 4 padding tokens)
    assert int(m_chunk["useful_tokens"]) == int(np.sum(host["segment_ids"] != 0)) == 8 * SEQ - 4
    for path, a in jax.tree_util.tree_leaves_with_path(g_chunk):
        b = g_full
        for k in path:
            b = b[k.key]
        assert np.linalg.norm(b) > 0, path
        assert _rel(a, b) <= RTOL, (path, _rel(a, b))
    if devices > 1 or grad_accum == 1:
        return  # eval: one case is enough (micro-batches, ragged chunks)
    e_full = jax.device_get(full.eval_loss(params, full.shard_batch(host)))
    e_chunk = jax.device_get(chunked.eval_loss(params, chunked.shard_batch(host)))
    assert float(e_chunk["ce_sum"]) == pytest.approx(float(e_full["ce_sum"]), rel=RTOL)
    assert float(e_chunk["loss_tokens"]) == float(e_full["loss_tokens"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hidden_states_and_head_give_the_logits_bit_for_bit(dtype):
    config = tiny_config()
    model = Transformer(model_config(config.model).replace(dtype=dtype))
    host = fixed_batch()
    params = model.init(jax.random.key(0), host["input_ids"])["params"]
    kwargs = dict(positions_BxL=host["positions"], segment_ids_BxL=host["segment_ids"])
    logits = model.apply({"params": params}, host["input_ids"], **kwargs)
    x, head = model.apply({"params": params}, host["input_ids"], return_hidden=True, **kwargs)
    assert x.shape == (8, SEQ, 32) and head.shape == (32, VOCAB) and x.dtype == logits.dtype
    np.testing.assert_array_equal(np.asarray(lm_head_logits(x, head), np.float32),
                                  np.asarray(logits, np.float32))


def _largest_vocab_f32(trainer) -> int:
    """Elements of the largest float32 array with a vocab-sized dim in the compiled gradient
    step (the train step's forward and backward pass, without the optimizer)."""
    params = trainer.init_state(1).params
    batch = trainer.shard_batch(fixed_batch())
    with jax.set_mesh(trainer.mesh):
        hlo = trainer._jitted("grads").lower(params, batch, None).compile().as_text()
    sizes = [int(np.prod(dims)) for dims in
             ([int(d) for d in m.split(",")] for m in re.findall(r"f32\[([\d,]+)\]", hlo))
             if HLO_VOCAB in dims]
    return max(sizes)


def test_compiled_chunked_step_holds_no_full_logits():
    B, C = 8, 4
    full, chunked = (_trainer(c, vocab=HLO_VOCAB) for c in (0, C))
    assert _largest_vocab_f32(full) >= B * SEQ * HLO_VOCAB  # the check can see full logits
    # chunked: the largest is one chunk's logits (or the [D, V] head: 32 x V = B x C x V here)
    assert _largest_vocab_f32(chunked) <= B * C * HLO_VOCAB


def test_loss_chunk_must_be_non_negative():
    config = tiny_config()
    config.train.loss_chunk = -1
    with pytest.raises(PhasedError, match=r"train\.loss_chunk"):
        validate_config(config, ("train",))
