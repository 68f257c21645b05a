"""The train state and the `Trainer` that builds mesh, model, shardings and steps from a config.

Every array is created where it lives: `init_state` jits the initialiser with `out_shardings`
derived from `jax.eval_shape`, so no device ever holds the whole model.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from phased_jax import sharding
from phased_jax.config import model_config
from phased_jax.errors import ConfigError
from phased_jax.model import Transformer
from phased_jax.model.config import ModelConfig
from phased_jax.model.flops import flops_per_token


@flax.struct.dataclass
class TrainState:
    """Step counter, parameters, optimizer state and the length of the run (phase) it is in.

    `num_steps` and `warmup_steps` are arrays, not constants: the LR schedule reads them at run
    time, so every phase runs the same compiled step (both are counted on the host). `tx` (AdamW
    without its LR scaling) and `lr_fn` (step, num_steps, warmup) -> LR are static and shared
    by all phases.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    num_steps: jax.Array
    warmup_steps: jax.Array
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    lr_fn: Any = flax.struct.field(pytree_node=False)

    def schedule(self, step: Any) -> jax.Array:
        """The LR at `step` of this run."""
        return self.lr_fn(step, self.num_steps, self.warmup_steps)


def training_model_config(config: ConfigDict) -> ModelConfig:
    """The model section with the train section's precision (compute bf16, params f32 default)."""
    cfg = model_config(config.model)
    return cfg.replace(dtype=config.train.get("compute_dtype", cfg.dtype),
                       param_dtype=config.train.get("param_dtype", cfg.param_dtype))


def boxed_abstract_params(model: Transformer) -> Any:
    """Parameter shapes with their logical-axis boxes, without allocating anything."""
    ids = jnp.zeros((1, 8), jnp.int32)
    return jax.eval_shape(lambda rng: model.init(rng, ids)["params"], jax.random.key(0))


def _unbox(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


class Trainer:
    """Mesh, rules, model and step for one experiment config; one instance serves every phase.

    Per phase: `state = trainer.init_state(num_steps, params=prev.params)` (fresh optimizer and
    schedule), then `state, metrics = trainer.step(state, trainer.shard_batch(batch))`.
    """

    def __init__(self, config: ConfigDict, devices: list[Any] | None = None) -> None:
        self.config = config
        tc = config.train
        self.model_cfg = training_model_config(config)
        self.model = Transformer(self.model_cfg)
        self.mesh: Mesh = sharding.make_mesh(config.mesh, devices)
        self.rules = sharding.rules_from_config(config.mesh)
        self.grad_accum = int(tc.grad_accum)
        self.global_batch = int(tc.global_batch)
        sharding.check_batch(self.global_batch, self.grad_accum, self.mesh, self.rules)
        boxed = boxed_abstract_params(self.model)
        self.param_specs = sharding.logical_specs(boxed)  # logical names per parameter
        self.abstract_params = _unbox(boxed)
        self.param_shardings = sharding.tree_shardings(self.abstract_params, self.param_specs,
                                                       self.mesh, self.rules)
        self.batch_sharding: NamedSharding = sharding.batch_sharding(self.mesh, self.rules)
        self._steps: dict[Any, Any] = {}
        from phased_jax.train.optimizer import lr_at, unscaled_adamw
        self.tx = unscaled_adamw(tc)
        self.lr_fn = functools.partial(lr_at, tc)

    # -- state ---------------------------------------------------------------------------------
    def state_shardings(self) -> TrainState:
        """Shardings of a TrainState: moments shard like their parameters, scalars replicate."""
        replicated = NamedSharding(self.mesh, PartitionSpec())
        params_def = jax.tree.structure(self.abstract_params)
        is_params = lambda x: jax.tree.structure(x) == params_def
        opt_abstract = jax.eval_shape(self.tx.init, self.abstract_params)
        opt_shardings = jax.tree.map(
            lambda x: self.param_shardings if is_params(x) else replicated, opt_abstract,
            is_leaf=is_params)
        return TrainState(step=replicated, params=self.param_shardings, opt_state=opt_shardings,
                          num_steps=replicated, warmup_steps=replicated, tx=self.tx,
                          lr_fn=self.lr_fn)

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings: the restore target for Orbax (any mesh)."""
        shapes = jax.eval_shape(self._fresh, jax.random.key(0), jnp.int32(1), jnp.int32(0))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_shardings())

    def _cast(self, params: Any) -> Any:
        dtype = jnp.dtype(self.model_cfg.param_dtype)
        return jax.tree.map(lambda p: p.astype(dtype), params)

    def _fresh(self, rng: jax.Array, num_steps: jax.Array, warmup: jax.Array) -> TrainState:
        params = _unbox(self.model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"])
        return self._from_params(params, num_steps, warmup)

    def _from_params(self, params: Any, num_steps: jax.Array, warmup: jax.Array) -> TrainState:
        params = self._cast(params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.tx.init(params),
                          num_steps=jnp.asarray(num_steps, jnp.int32),
                          warmup_steps=jnp.asarray(warmup, jnp.int32), tx=self.tx,
                          lr_fn=self.lr_fn)

    def _run_length(self, num_steps: int) -> tuple[jax.Array, jax.Array]:
        """(num_steps, warmup steps) of a run, counted on the host, as the state carries them."""
        from phased_jax.train.optimizer import warmup_steps

        return jnp.int32(num_steps), jnp.int32(warmup_steps(self.config.train, num_steps))

    def with_run_length(self, state: TrainState, num_steps: int) -> TrainState:
        """`state` continuing as a run of `num_steps` steps (`train.carry_optimizer`)."""
        n, w = self._run_length(num_steps)
        return state.replace(num_steps=n, warmup_steps=w)

    def init_state(self, num_steps: int, params: Any = None, rng: jax.Array | None = None
                   ) -> TrainState:
        """A sharded state for a run of `num_steps` steps (one phase).

        `params=None`: random init from `rng` (default: config.seed). Otherwise start from the
        given params (e.g. the previous phase's, or converted HF weights; any placement and
        float dtype) with fresh optimizer state and a fresh schedule, as the paper's phases do.
        """
        if num_steps < 1:
            raise ConfigError(f"a run needs at least one step, got num_steps={num_steps}")
        shardings = self.state_shardings()
        replicated = NamedSharding(self.mesh, PartitionSpec())
        n, w = self._run_length(num_steps)
        if params is None:
            rng = jax.random.key(int(self.config.seed)) if rng is None else rng
            return jax.jit(self._fresh, out_shardings=shardings)(rng, n, w)
        params = jax.device_put(params, self.param_shardings)
        return jax.jit(self._from_params,
                       in_shardings=(self.param_shardings, replicated, replicated),
                       out_shardings=shardings)(params, n, w)

    # -- batches and steps -----------------------------------------------------------------------
    def shard_batch(self, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This host's rows of the global batch -> global arrays sharded along `batch`."""
        n_proc = jax.process_count()
        out = {}
        for key, x in host_batch.items():
            x = np.asarray(x, np.int32)
            global_shape = (x.shape[0] * n_proc,) + x.shape[1:]
            out[key] = jax.make_array_from_process_local_data(self.batch_sharding, x, global_shape)
        return out

    def _compiled_step(self, state: TrainState):
        key = "train"
        if key not in self._steps:
            from phased_jax.train.step import train_step
            fn = functools.partial(train_step, model=self.model, rules=self.rules,
                                   grad_accum=self.grad_accum, z_loss=float(self.config.train.z_loss))
            shardings = self.state_shardings()
            self._steps[key] = jax.jit(fn, in_shardings=(shardings, self.batch_sharding),
                                       out_shardings=(shardings, None), donate_argnums=(0,))
        return self._steps[key]

    def step(self, state: TrainState, batch: dict[str, jax.Array]
             ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One jitted, donated update (the input state is consumed). Metrics stay on device."""
        with jax.set_mesh(self.mesh):
            return self._compiled_step(state)(state, batch)

    def grads(self, params: Any, batch: dict[str, jax.Array]) -> tuple[Any, dict[str, jax.Array]]:
        """Mean-loss gradients without an update (tests, debugging); not donated."""
        if "grads" not in self._steps:
            from phased_jax.train.step import compute_grads
            fn = functools.partial(compute_grads, model=self.model, rules=self.rules,
                                   grad_accum=self.grad_accum, z_loss=float(self.config.train.z_loss))
            self._steps["grads"] = jax.jit(fn, in_shardings=(self.param_shardings, self.batch_sharding),
                                           out_shardings=(self.param_shardings, None))
        with jax.set_mesh(self.mesh):
            return self._steps["grads"](params, batch)

    def eval_loss(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Summed CE and token count of a batch, in `grad_accum` micro-batches (for eval loss)."""
        if "eval" not in self._steps:
            from phased_jax.train.step import eval_sums
            fn = functools.partial(eval_sums, model=self.model, rules=self.rules,
                                   grad_accum=self.grad_accum)
            self._steps["eval"] = jax.jit(fn, in_shardings=(self.param_shardings, self.batch_sharding))
        with jax.set_mesh(self.mesh):
            return self._steps["eval"](params, batch)

    def flops_per_step(self, seq_len: int) -> float:
        """Model matmul FLOPs of one training step on the global batch (for MFU)."""
        return flops_per_token(self.model_cfg, seq_len) * self.global_batch * seq_len


def build_trainer(config: ConfigDict, devices: list[Any] | None = None) -> Trainer:
    """Everything the phase runner needs from one experiment ConfigDict."""
    return Trainer(config, devices)
