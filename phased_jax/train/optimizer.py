"""AdamW as the paper ran it, as one optax chain whose LR schedule restarts with each phase.

The schedule's last transform reads the run's length from its own state, not from a constant
baked into the compiled step, so one compiled step serves every phase: a phase starts with
`start_run(tx.init(params), ...)` and the chain does the rest.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from phased_jax.errors import ConfigError

NO_DECAY_NAMES = ("scale",)  # RMSNorm gains; the model has no biases
SCHEDULES = ("cosine", "linear", "constant")
SCHEDULE_SCOPES = ("phase", "run")  # train.schedule_scope: one schedule per phase, or one in all


def warmup_steps(train_cfg: ConfigDict, num_steps: int) -> int:
    """ceil(warmup_ratio * num_steps) on the host in float64, as transformers' Trainer counts it
    (float32 on device is one step off for e.g. ratio 0.15 at 100 steps)."""
    return math.ceil(float(train_cfg.warmup_ratio) * int(num_steps))


def lr_at(train_cfg: ConfigDict, step: Any, num_steps: Any, warmup: Any) -> jax.Array:
    """The LR at `step` of a run of `num_steps` steps with `warmup` warmup steps (arrays or ints).

    Linear warmup, then cosine/linear decay to the end, as Hugging Face's
    `get_cosine_schedule_with_warmup`: 0 at step 0, `min_lr_ratio * lr` at `num_steps`.
    """
    lr, kind = float(train_cfg.lr), train_cfg.schedule
    if kind not in SCHEDULES:
        raise ConfigError(f"config.train.schedule {kind!r} is not one of {', '.join(SCHEDULES)}")
    step = jnp.asarray(step, jnp.float32)
    n = jnp.maximum(jnp.asarray(num_steps, jnp.float32), 1.0)
    warmup = jnp.asarray(warmup, jnp.float32)
    end = lr * float(train_cfg.min_lr_ratio)
    if kind == "constant":
        decayed = jnp.float32(lr)
    else:
        frac = jnp.clip((step - warmup) / jnp.maximum(n - warmup, 1.0), 0.0, 1.0)
        shape = 0.5 * (1.0 + jnp.cos(jnp.pi * frac)) if kind == "cosine" else 1.0 - frac
        decayed = end + (lr - end) * shape
    return jnp.where(step < warmup, lr * step / jnp.maximum(warmup, 1.0), decayed)


class RunScheduleState(NamedTuple):
    """The schedule's position in its run; `lr` is the LR of the latest update (a metric)."""

    count: jax.Array
    num_steps: jax.Array
    warmup_steps: jax.Array
    lr: jax.Array


def scale_by_run_schedule(train_cfg: ConfigDict) -> optax.GradientTransformation:
    """Multiply updates by -LR(count, num_steps, warmup_steps), all read from the state."""
    lr_at(train_cfg, 0, 1, 0)  # an unknown schedule kind fails here, not inside jit

    def init(params: Any) -> RunScheduleState:
        del params
        zero = jnp.zeros((), jnp.int32)
        return RunScheduleState(zero, jnp.ones((), jnp.int32), zero, jnp.zeros((), jnp.float32))

    def update(updates: Any, state: RunScheduleState, params: Any = None
               ) -> tuple[Any, RunScheduleState]:
        del params
        lr = lr_at(train_cfg, state.count, state.num_steps, state.warmup_steps)
        updates = jax.tree.map(lambda u: (-lr).astype(u.dtype) * u, updates)
        return updates, state._replace(count=optax.safe_increment(state.count), lr=lr)

    return optax.GradientTransformation(init, update)


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: every parameter but the norms' scales."""
    def keep(path, _):
        return not any(getattr(k, "key", None) in NO_DECAY_NAMES for k in path)
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(train_cfg: ConfigDict) -> optax.GradientTransformation:
    """Clip by global norm, Adam moments, decoupled weight decay off the norms, then the run's
    LR schedule: the whole AdamW of a phase. Start each run with `start_run`."""
    mu_dtype = jnp.dtype(train_cfg.opt_state_dtype) if train_cfg.get("opt_state_dtype") else None
    parts = []
    if float(train_cfg.clip_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(train_cfg.clip_norm)))
    parts += [optax.scale_by_adam(b1=float(train_cfg.b1), b2=float(train_cfg.b2),
                                  eps=float(train_cfg.eps), mu_dtype=mu_dtype),
              optax.add_decayed_weights(float(train_cfg.weight_decay), mask=decay_mask),
              scale_by_run_schedule(train_cfg)]
    return optax.chain(*parts)


def run_length(train_cfg: ConfigDict, num_steps: int) -> tuple[jax.Array, jax.Array]:
    """(num_steps, warmup steps) of a run, counted on the host, as the schedule state holds them."""
    if num_steps < 1:
        raise ConfigError(f"a run needs at least one step, got num_steps={num_steps}")
    return jnp.int32(num_steps), jnp.int32(warmup_steps(train_cfg, num_steps))


def start_run(opt_state: Any, num_steps: Any, warmup: Any) -> Any:
    """`opt_state` with its schedule sized to a run of `num_steps` steps (arrays: jit-safe).

    A fresh `tx.init` state starts the run at step 0; a carried state (`train.schedule_scope=run`)
    keeps its moments and count and only learns the new length.
    """
    return optax.tree_utils.tree_set(opt_state, num_steps=jnp.asarray(num_steps, jnp.int32),
                                     warmup_steps=jnp.asarray(warmup, jnp.int32))


def schedule_state(opt_state: Any) -> RunScheduleState:
    """The schedule's state inside a `make_optimizer` state."""
    return optax.tree_utils.tree_get(opt_state, "RunScheduleState")
