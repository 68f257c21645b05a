"""The `Trainer`: mesh, model, optimizer, shardings and jitted steps for one experiment.

Every array is created where it lives: `init_state` jits the initialiser with `out_shardings`
derived from `jax.eval_shape`, so no device ever holds the whole model.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from phased_jax import sharding
from phased_jax.config import model_config
from phased_jax.data.tokens import BATCH_KEYS
from phased_jax.model import Transformer
from phased_jax.model.attention import resolve_attention_impl
from phased_jax.model.config import ModelConfig
from phased_jax.model.flops import flops_per_token
from phased_jax.model.lora import LoraSpec, spec_from_section
from phased_jax.model.lora import join as lora_join
from phased_jax.model.lora import merge as lora_merge
from phased_jax.model.lora import split as lora_split
from phased_jax.model.params import abstract_params
from phased_jax.model.quant import BLOCK_AXIS, QUANTISED, quantize
from phased_jax.train import optimizer
from phased_jax.train.loss import compute_grads, eval_sums
from phased_jax.train.state import TrainState
from phased_jax.train.step import train_step

DROPOUT_STREAM = 0x64726F70  # "drop": folded into the seed's key before the phase index


class Trainer:
    """Mesh, rules, model and steps for one experiment; one instance serves every phase.

    Built from the sections it depends on: the model's shapes and precision, the `train`
    section (optimizer, batch, loss) and the `mesh` section. Per phase:
    `state = trainer.init_state(num_steps, params=prev.params)` (fresh optimizer and schedule),
    then `state, metrics = trainer.step(state, trainer.shard_batch(batch))`.
    """

    def __init__(self, model_cfg: ModelConfig, train_cfg: ConfigDict, mesh_cfg: ConfigDict, *,
                 seed: int = 0, devices: list[Any] | None = None, packing: bool = False,
                 lora: LoraSpec | None = None) -> None:
        self.placement = sharding.Placement.from_config(mesh_cfg, devices)
        # The model runs the kernel of the devices the steps are compiled for (a TPU topology's
        # too, from a CPU host); one they cannot run is a ConfigError before any compile.
        # `model_cfg` (saved with params) keeps the configured name, e.g. `auto`.
        attention_impl = resolve_attention_impl(
            model_cfg.attention_impl, self.placement.mesh.devices.flat[0].platform,
            packing=packing, dtype=model_cfg.dtype)
        self.model_cfg, self.train_cfg, self.seed = model_cfg, train_cfg, int(seed)
        # With `lora` the state trains the adapters only; the frozen base is an argument of the
        # steps (`set_base`), in no checkpoint and with no gradient or optimizer state.
        self.lora = lora
        self.model = Transformer(model_cfg.replace(attention_impl=attention_impl), lora=lora)
        # the model the train step runs: with adapter dropout, one that draws its masks
        self.train_model = self.model
        self.dropout_key: np.ndarray | None = None  # this phase's (`set_phase`)
        if lora is not None and lora.dropout > 0:
            self.train_model = self.model.clone(train=True)
            self.set_phase(0)
        self.mesh, self.rules = self.placement.mesh, self.placement.rules
        self.grad_accum = int(train_cfg.grad_accum)
        self.global_batch = int(train_cfg.global_batch)
        self.z_loss = float(train_cfg.z_loss)
        self.loss_chunk = int(train_cfg.get("loss_chunk", 0))
        sharding.check_batch(self.global_batch, self.grad_accum, self.mesh, self.rules)
        self.abstract_params = abstract_params(model_cfg, lora)
        self.param_shardings = sharding.param_shardings(model_cfg, self.placement, lora)
        self.base_shardings: Any = None
        self.base: Any = None
        # where a base read from disk goes before `set_base` quantises it (if it does)
        self.load_shardings: Any = None
        if lora is not None:
            self.base_shardings, self.param_shardings = lora_split(self.param_shardings)
            self.abstract_base, self.abstract_params = lora_split(self.abstract_params)
            self.load_shardings = self.base_shardings if not lora.base_qtype else lora_split(
                sharding.param_shardings(model_cfg, self.placement,
                                         dataclasses.replace(lora, base_qtype="")))[0]
        self.batch_sharding: NamedSharding = self.placement.batch_sharding
        self.tx = optimizer.make_optimizer(train_cfg)
        self._steps: dict[str, Any] = {}

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
        return TrainState(step=replicated, params=self.param_shardings, opt_state=opt_shardings)

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings: the restore target for Orbax (any mesh)."""
        shapes = jax.eval_shape(self._fresh, jax.random.key(0), jnp.int32(1), jnp.int32(0))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_shardings())

    def _fresh(self, rng: jax.Array, num_steps: jax.Array, warmup: jax.Array) -> TrainState:
        params = self.model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]
        if self.lora is not None:  # fresh adapters (the base's init is dead code under jit)
            params = lora_split(nn.meta.unbox(params))[1]
        return self._from_params(params, num_steps, warmup)

    def _from_params(self, params: Any, num_steps: jax.Array, warmup: jax.Array) -> TrainState:
        # adapters and their optimizer state stay float32 whatever the base's dtype
        dtype = jnp.dtype("float32" if self.lora is not None else self.model_cfg.param_dtype)
        params = jax.tree.map(lambda p: p.astype(dtype), nn.meta.unbox(params))
        opt_state = optimizer.start_run(self.tx.init(params), num_steps, warmup)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)

    def with_run_length(self, state: TrainState, num_steps: int) -> TrainState:
        """`state` continuing as a run of `num_steps` steps (`train.schedule_scope=run`)."""
        n, w = optimizer.run_length(self.train_cfg, num_steps)
        return state.replace(opt_state=optimizer.start_run(state.opt_state, n, w))

    def init_state(self, num_steps: int, params: Any = None, rng: jax.Array | None = None
                   ) -> TrainState:
        """A sharded state for a run of `num_steps` steps (one phase).

        `params=None`: random init from `rng` (default: the trainer's seed). Otherwise start
        from the given params (e.g. the previous phase's, or converted HF weights; any placement
        and float dtype) with fresh optimizer state and a fresh schedule, as the paper's phases do.
        """
        n, w = optimizer.run_length(self.train_cfg, num_steps)
        shardings = self.state_shardings()
        replicated = NamedSharding(self.mesh, PartitionSpec())
        if params is None:
            rng = jax.random.key(self.seed) if rng is None else rng
            return jax.jit(self._fresh, out_shardings=shardings)(rng, n, w)
        params = jax.device_put(params, self.param_shardings)
        return jax.jit(self._from_params,
                       in_shardings=(self.param_shardings, replicated, replicated),
                       out_shardings=shardings)(params, n, w)

    def set_base(self, params: Any) -> None:
        """The frozen base of a LoRA run (any placement; cast to `param_dtype`), placed as the
        full model's params would be. With `model.lora.base_qtype` a float base is quantised
        here, one projection at a time (`hf.load(..., quantize=...)` quantises on the host as
        it reads, so the float base is never on the devices whole)."""
        dtype = jnp.dtype(self.model_cfg.param_dtype)
        base = nn.meta.unbox(params)
        qtype = self.lora.base_qtype if self.lora is not None else ""
        if qtype:
            layers = {m: dict(v) for m, v in base["layers"].items()}
            for module, names in layers.items():
                for name in [n for n in names if n in QUANTISED]:
                    want = self.base_shardings["layers"][module]
                    layers[module][f"{name}_q"], layers[module][f"{name}_absmax"] = jax.jit(
                        functools.partial(quantize, qtype=qtype, axis=BLOCK_AXIS[name]),
                        out_shardings=(want[f"{name}_q"], want[f"{name}_absmax"]))(
                            names.pop(name).astype(dtype))
            base = {**base, "layers": layers}
        base = jax.tree_util.tree_map_with_path(
            lambda path, p: p if _is_quantised(path) else p.astype(dtype), base)
        self.base = jax.device_put(base, self.base_shardings)

    def set_phase(self, k: int) -> None:
        """Adapter dropout draws phase k's masks (one key a phase, folded with the step), from
        a stream of its own: `fold_in(key(seed), k)` initialises phase k's fresh adapters."""
        if self.train_model is not self.model:
            stream = jax.random.fold_in(jax.random.key(self.seed), DROPOUT_STREAM)
            self.dropout_key = np.asarray(jax.random.key_data(jax.random.fold_in(stream, k)))

    def merge_into_base(self, adapters: Any) -> None:
        """`model.lora.merge_each_phase`: the base becomes base + scale * A B (`lora.merge`, in
        the base's dtype, sharded as it is; the old base's memory is reused)."""
        if "merge" not in self._steps:
            self._steps["merge"] = jax.jit(
                functools.partial(lora_merge, self.model_cfg, self.lora),
                in_shardings=(self.base_shardings, self.param_shardings),
                out_shardings=self.base_shardings, donate_argnums=(0,))
        adapters = jax.device_put(adapters, self.param_shardings)
        with jax.set_mesh(self.mesh):
            self.base = self._steps["merge"](self._frozen(), adapters)

    def full_params(self, params: Any) -> Any:
        """The model's whole params tree from a state's `params` (with LoRA: base + adapters)."""
        return params if self.lora is None else lora_join(self.base, params)

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

    def _jitted(self, name: str) -> Any:
        """The jitted train step, gradient or eval function, compiled once per trainer."""
        if name not in self._steps:
            common = dict(model=self.model, rules=self.rules, grad_accum=self.grad_accum,
                          loss_chunk=self.loss_chunk)
            base = self.base_shardings  # the frozen base's (None without LoRA)
            if name == "train":
                shardings = self.state_shardings()
                dropout = None if self.dropout_key is None else NamedSharding(
                    self.mesh, PartitionSpec())
                fn = jax.jit(functools.partial(train_step, tx=self.tx, z_loss=self.z_loss,
                                               **{**common, "model": self.train_model}),
                             in_shardings=(shardings, self.batch_sharding, base, dropout),
                             out_shardings=(shardings, None), donate_argnums=(0,))
            elif name == "grads":
                fn = jax.jit(functools.partial(compute_grads, z_loss=self.z_loss, **common),
                             in_shardings=(self.param_shardings, self.batch_sharding, base),
                             out_shardings=(self.param_shardings, None))
            else:
                fn = jax.jit(functools.partial(eval_sums, **common),
                             in_shardings=(self.param_shardings, self.batch_sharding, base))
            self._steps[name] = fn
        return self._steps[name]

    def step(self, state: TrainState, batch: dict[str, jax.Array]
             ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One jitted, donated update (the input state is consumed). Metrics stay on device."""
        with jax.set_mesh(self.mesh):
            return self._jitted("train")(state, batch, self._frozen(), self.dropout_key)

    def grads(self, params: Any, batch: dict[str, jax.Array]) -> tuple[Any, dict[str, jax.Array]]:
        """Mean-loss gradients without an update (tests, debugging); not donated."""
        with jax.set_mesh(self.mesh):
            return self._jitted("grads")(params, batch, self._frozen())

    def eval_loss(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Summed CE and token count of a batch, in `grad_accum` micro-batches (for eval loss)."""
        with jax.set_mesh(self.mesh):
            return self._jitted("eval")(params, batch, self._frozen())

    def _frozen(self) -> Any:
        if self.lora is not None and self.base is None:
            raise RuntimeError("a LoRA Trainer needs its base: call set_base(params) first")
        return self.base

    def lower(self, name: str, seq_len: int) -> jax.stages.Lowered:
        """The jitted `train` or `eval` step lowered for abstract inputs of one global batch of
        `seq_len` tokens a row: what `phased-jax compile` compiles, allocating nothing."""
        batch = {k: jax.ShapeDtypeStruct((self.global_batch, seq_len), jnp.int32,
                                         sharding=self.batch_sharding) for k in BATCH_KEYS}
        state = self.abstract_state()
        base = None if self.lora is None else jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            self.abstract_base, self.base_shardings)
        with jax.set_mesh(self.mesh):
            if name == "train":
                key = None if self.dropout_key is None else jax.ShapeDtypeStruct(
                    self.dropout_key.shape, self.dropout_key.dtype)
                return self._jitted("train").lower(state, batch, base, key)
            return self._jitted(name).lower(state.params, batch, base)

    def flops_per_step(self, seq_len: int) -> float:
        """Model matmul FLOPs of one training step on the global batch (for MFU)."""
        return flops_per_token(self.model_cfg, seq_len) * self.global_batch * seq_len


def _is_quantised(path: tuple) -> bool:
    """Whether a base leaf is a quantised projection's codes or scales (kept as stored)."""
    name = str(getattr(path[-1], "key", path[-1]))
    return name.endswith(("_q", "_absmax"))


def build_trainer(config: ConfigDict, devices: list[Any] | None = None) -> Trainer:
    """The Trainer of one experiment ConfigDict: its model (and LoRA adapters), train and mesh
    sections and seed."""
    return Trainer(model_config(config.model), config.train, config.mesh, seed=config.seed,
                   devices=devices, packing=bool(config.get("data", {}).get("packing", False)),
                   lora=spec_from_section(config.model.get("lora")))
