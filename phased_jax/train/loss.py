"""The loss: masked next-token cross-entropy summed over response tokens, in micro-batches.

The loss is a *sum* over response tokens divided once by the number of response tokens of the
whole global batch, so accumulating micro-batch gradients gives exactly the big batch's
gradient (up to float summation order), whatever the micro-batches' token counts.

With `train.loss_chunk` = C > 0 the model returns its final hidden states and the LM head is
applied C positions at a time inside a rematerialised `lax.scan`: only one chunk's [B, C, vocab]
float32 logits (and, in the backward pass, their gradient) are ever live, never [B, L, vocab].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from phased_jax.model.lora import join as lora_join
from phased_jax.model.transformer import lm_head_logits

Batch = dict[str, jax.Array]


def cross_entropy_sums(logits_BxLxV: jax.Array, targets_BxL: jax.Array, mask_BxL: jax.Array,
                       z_loss: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy and z-loss over tokens where `mask_BxL` is 1 (float32).

    Targets are already shifted, so the logits are used whole (no slicing copy of [B, L, V]);
    a masked token's terms are multiplied by exactly 0, so it contributes exactly zero gradient.
    """
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    mask_BxL = mask_BxL.astype(jnp.float32)
    ce_sum = jnp.sum((lse_BxL - target_BxL) * mask_BxL)
    z_sum = z_loss * jnp.sum(jnp.square(lse_BxL) * mask_BxL) if z_loss else jnp.zeros((), jnp.float32)
    return ce_sum, z_sum


def chunked_cross_entropy_sums(x_BxLxD: jax.Array, head_DxV: jax.Array, targets_BxL: jax.Array,
                               mask_BxL: jax.Array, z_loss: float = 0.0, chunk: int = 512
                               ) -> tuple[jax.Array, jax.Array]:
    """`cross_entropy_sums(lm_head_logits(x, head), ...)` computed `chunk` positions at a time.

    A `lax.scan` over chunks of the sequence whose body is `jax.checkpoint`ed: the forward pass
    keeps only the running sums, the backward pass recomputes each chunk's logits. A ragged last
    chunk is padded with masked positions, which add exactly zero to the sums and gradients.
    The head enters each chunk in its parameter dtype (cast inside), so its gradient accumulates
    over the chunks in that dtype (float32), not the compute dtype; it is gathered once, before
    the loop (sharded along `vocab` only, as the logits are).
    """
    B, L, D = x_BxLxD.shape
    C = min(chunk, L)
    n = -(-L // C)
    if n * C != L:
        pad = n * C - L
        x_BxLxD = jnp.pad(x_BxLxD, ((0, 0), (0, pad), (0, 0)))
        targets_BxL = jnp.pad(targets_BxL, ((0, 0), (0, pad)))
        mask_BxL = jnp.pad(mask_BxL, ((0, 0), (0, pad)))

    def chunks(a, axes):  # [B, n*C, ...] -> [n, B, C, ...]
        a = a.reshape(B, n, C, *a.shape[2:]).swapaxes(0, 1)
        return nn.with_logical_constraint(a, (None, "batch", "length", *axes))

    @jax.checkpoint
    def one(head_DxV, x_BxCxD, targets_BxC, mask_BxC):
        return cross_entropy_sums(lm_head_logits(x_BxCxD, head_DxV), targets_BxC, mask_BxC, z_loss)

    def body(carry, xs):
        ce_sum, z_sum = one(head_DxV, *xs)
        return (carry[0] + ce_sum, carry[1] + z_sum), None

    head_DxV = nn.with_logical_constraint(head_DxV, (None, "act_vocab"))
    zero = jnp.zeros((), jnp.float32)
    (ce_sum, z_sum), _ = jax.lax.scan(
        body, (zero, zero),
        (chunks(x_BxLxD, ("act_embed",)), chunks(targets_BxL, ()), chunks(mask_BxL, ())))
    return ce_sum, z_sum


def make_loss_fn(model: nn.Module, z_loss: float, loss_chunk: int = 0
                 ) -> Callable[..., tuple[jax.Array, Any]]:
    """loss_fn(params, batch, rng=None) -> (ce_sum + z_sum, (ce_sum, z_sum)) for one
    (micro-)batch; `loss_chunk` > 0: the LM head and the loss `loss_chunk` positions at a time;
    `rng`: the dropout key of a model that trains with dropout (LoRA's)."""
    def loss_fn(params: Any, batch: Batch, rng: jax.Array | None = None):
        out = model.apply({"params": params}, batch["input_ids"], positions_BxL=batch["positions"],
                          segment_ids_BxL=batch["segment_ids"], return_hidden=loss_chunk > 0,
                          rngs=None if rng is None else {"dropout": rng})
        if loss_chunk > 0:
            x_BxLxD, head_DxV = out
            ce_sum, z_sum = chunked_cross_entropy_sums(x_BxLxD, head_DxV, batch["targets"],
                                                       batch["loss_mask"], z_loss, loss_chunk)
        else:
            ce_sum, z_sum = cross_entropy_sums(out, batch["targets"], batch["loss_mask"], z_loss)
        return ce_sum + z_sum, (ce_sum, z_sum)
    return loss_fn


def _with_frozen(loss_fn: Callable, frozen: Any) -> Callable:
    """`loss_fn` over the trainable params only, the `frozen` base joined in (LoRA)."""
    if frozen is None:
        return loss_fn
    return lambda params, batch, rng=None: loss_fn(lora_join(frozen, params), batch, rng)


def split_micro(batch: Batch, grad_accum: int) -> Batch:
    """[B, L] -> [A, B/A, L], micro-batch a = rows a, a+A, ...: each device keeps its own rows."""
    def split(x_BxL):
        B, L = x_BxL.shape
        x_AxbxL = x_BxL.reshape(B // grad_accum, grad_accum, L).swapaxes(0, 1)
        return nn.with_logical_constraint(x_AxbxL, (None, "batch", "length"))
    return {k: split(v) for k, v in batch.items()}


def sum_grads(loss_fn: Callable, params: Any, batch: Batch, grad_accum: int,
              rng: jax.Array | None = None) -> tuple[Any, jax.Array, jax.Array]:
    """Gradients of the summed loss over the batch, and the summed CE and z terms.

    With grad_accum > 1 a `lax.scan` runs the micro-batches one after the other, so activation
    memory is that of one micro-batch; gradients accumulate in the parameters' dtype. `rng`:
    dropout's key, micro-batch a's `fold_in(rng, a)`.
    """
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if grad_accum == 1:
        grads, (ce_sum, z_sum) = grad_fn(params, batch, rng)
        return grads, ce_sum, z_sum

    def body(carry, xs):
        grads_acc, ce_acc, z_acc = carry
        micro, a = xs
        grads, (ce_sum, z_sum) = grad_fn(params, micro,
                                         None if rng is None else jax.random.fold_in(rng, a))
        grads_acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), grads_acc, grads)
        return (grads_acc, ce_acc + ce_sum, z_acc + z_sum), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (grads, ce_sum, z_sum), _ = jax.lax.scan(
        body, init, (split_micro(batch, grad_accum), jnp.arange(grad_accum)))
    return grads, ce_sum, z_sum


def compute_grads(params: Any, batch: Batch, frozen: Any = None, rng: jax.Array | None = None,
                  *, model: nn.Module, rules: Any, grad_accum: int = 1, z_loss: float = 0.0,
                  loss_chunk: int = 0) -> tuple[Any, dict[str, jax.Array]]:
    """Gradients of the mean loss over the global batch's response tokens, and loss metrics
    (`useful_tokens`: the batch's non-padding tokens, for useful throughput). `frozen`: a LoRA
    run's base, joined to `params` (the adapters) in the forward pass and given no gradient;
    `rng`: the dropout key when `model` trains with dropout."""
    with nn.logical_axis_rules(rules):
        n_tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
        denom = jnp.maximum(n_tokens, 1.0)
        grads, ce_sum, z_sum = sum_grads(_with_frozen(make_loss_fn(model, z_loss, loss_chunk),
                                                      frozen), params, batch, grad_accum, rng)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    return grads, {"loss": ce_sum / denom, "z_loss": z_sum / denom, "loss_tokens": n_tokens,
                   "useful_tokens": useful_tokens(batch)}


def useful_tokens(batch: Batch) -> jax.Array:
    """Non-padding tokens of a batch (`segment_ids` != 0)."""
    return jnp.sum(batch["segment_ids"] != 0, dtype=jnp.int32)


def eval_sums(params: Any, batch: Batch, frozen: Any = None, *, model: nn.Module, rules: Any,
              grad_accum: int = 1, loss_chunk: int = 0) -> dict[str, jax.Array]:
    """Summed CE and response-token count of a batch, in `grad_accum` micro-batches (and
    `loss_chunk` chunks) like training (so eval fits wherever training fits); sum over batches,
    then divide."""
    loss_fn = _with_frozen(make_loss_fn(model, 0.0, loss_chunk), frozen)
    with nn.logical_axis_rules(rules):
        tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
        if grad_accum == 1:
            _, (ce_sum, _) = loss_fn(params, batch)
        else:
            def body(acc, micro):
                return acc + loss_fn(params, micro)[1][0], None
            ce_sum, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                                     split_micro(batch, grad_accum))
    return {"ce_sum": ce_sum, "loss_tokens": tokens}
