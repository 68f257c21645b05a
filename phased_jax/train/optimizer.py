"""AdamW as the paper ran it, with a schedule sized to one run (one phase) at a time."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from phased_jax.errors import ConfigError

NO_DECAY_NAMES = ("scale",)  # RMSNorm gains; the model has no biases


def warmup_steps(train_cfg: ConfigDict, num_steps: int) -> int:
    """ceil(warmup_ratio * num_steps) on the host in float64, as transformers' Trainer counts it
    (float32 on device is one step off for e.g. ratio 0.15 at 100 steps)."""
    return math.ceil(float(train_cfg.warmup_ratio) * int(num_steps))


def lr_at(train_cfg: ConfigDict, step: Any, num_steps: Any, warmup: Any = None) -> jax.Array:
    """The LR at `step` of a run of `num_steps` steps with `warmup` warmup steps (arrays or ints).

    Linear warmup, then cosine/linear decay to the end, as Hugging Face's
    `get_cosine_schedule_with_warmup`: 0 at step 0, `min_lr_ratio * lr` at `num_steps`. Because
    the run length is an argument, not a constant baked into the step, one compiled step serves
    every phase. `warmup=None` computes it from `num_steps`, which must then be a host int.
    """
    lr, kind = float(train_cfg.lr), train_cfg.schedule
    if kind not in ("cosine", "linear", "constant"):
        raise ConfigError(f"config.train.schedule {kind!r} is not cosine, linear or constant")
    if warmup is None:
        warmup = warmup_steps(train_cfg, num_steps)
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


def make_schedule(train_cfg: ConfigDict, num_steps: int) -> optax.Schedule:
    """`lr_at` for a run of a fixed `num_steps` steps (each phase restarts it, as the paper does)."""
    if num_steps < 1:
        raise ConfigError(f"a run needs at least one step, got num_steps={num_steps}")
    lr_at(train_cfg, 0, num_steps)  # validates the schedule kind now
    return lambda step: lr_at(train_cfg, step, num_steps)


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: every parameter but the norms' scales."""
    def keep(path, _):
        return not any(getattr(k, "key", None) in NO_DECAY_NAMES for k in path)
    return jax.tree_util.tree_map_with_path(keep, params)


def unscaled_adamw(train_cfg: ConfigDict) -> optax.GradientTransformation:
    """Clip by global norm, Adam moments, decoupled weight decay off the norms: AdamW before
    its final `-lr *` scaling, which the train step applies with the LR of the step."""
    mu_dtype = jnp.dtype(train_cfg.opt_state_dtype) if train_cfg.get("opt_state_dtype") else None
    parts = []
    if float(train_cfg.clip_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(train_cfg.clip_norm)))
    parts.append(optax.chain(
        optax.scale_by_adam(b1=float(train_cfg.b1), b2=float(train_cfg.b2),
                            eps=float(train_cfg.eps), mu_dtype=mu_dtype),
        optax.add_decayed_weights(float(train_cfg.weight_decay), mask=decay_mask)))
    return optax.chain(*parts)


def make_optimizer(train_cfg: ConfigDict, num_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The complete AdamW of a run of `num_steps` steps, as one optax transformation."""
    schedule = make_schedule(train_cfg, num_steps)
    return optax.chain(unscaled_adamw(train_cfg), optax.scale_by_learning_rate(schedule)), schedule
