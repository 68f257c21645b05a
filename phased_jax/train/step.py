"""One optimizer update: gradients of the global batch's loss, then the optax chain."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import optax

from phased_jax.train.loss import Batch, compute_grads
from phased_jax.train.optimizer import schedule_state
from phased_jax.train.state import TrainState


def train_step(state: TrainState, batch: Batch, frozen: Any = None, rng: jax.Array | None = None,
               *, model: nn.Module, tx: optax.GradientTransformation, rules: Any,
               grad_accum: int = 1, z_loss: float = 0.0, loss_chunk: int = 0
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update on the global batch (jit this; see `Trainer.step`); `frozen`: a LoRA run's
    base (the state's params are then its adapters); `rng`: the phase's dropout key data
    (adapter dropout, uint32), this step's masks from `fold_in(key, step)`, so a resumed step
    draws the same."""
    if rng is not None:
        rng = jax.random.fold_in(jax.random.wrap_key_data(rng), state.step)
    grads, metrics = compute_grads(state.params, batch, frozen, rng, model=model, rules=rules,
                                   grad_accum=grad_accum, z_loss=z_loss, loss_chunk=loss_chunk)
    metrics["grad_norm"] = optax.tree.norm(grads)  # before clipping
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics["lr"] = schedule_state(opt_state).lr
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
