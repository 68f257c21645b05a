"""`phased-jax plan`: per-device memory and step time of a training config, before launching.

    phased-jax plan --config configs/llama2_7b_phased.py --num-devices 32 [--device v4]
    phased-jax plan --preset llama2-70b --num-devices 256 --config.mesh.shape='(1,-1,8)'

The plan reads the experiment's config: its model (shapes, precision, remat policy), mesh
shape and rule table, global batch, grad accumulation, optimizer-state dtype and data.max_length
(the sequence length). `--preset` alone plans the default config with that model (remat
`full`, as the paper's configs). Any field can be overridden as in `train`.

Parameter shapes come from `jax.eval_shape(model.init)` (nothing is allocated), per-device
bytes from the same logical->mesh rules the trainer shards with; activations are an analytic
estimate per remat policy (see `activation_bytes`); step time is FLOPs / (devices x peak x MFU).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from absl import flags
from jax.sharding import PartitionSpec
from ml_collections import ConfigDict

from phased_jax import sharding
from phased_jax.config import get_default_config, model_config, model_section
from phased_jax.config_cli import flag_value, parse_config_argv
from phased_jax.errors import UsageError
from phased_jax.model.config import PRESETS, ModelConfig
from phased_jax.model.flops import flops_per_token
from phased_jax.model.params import abstract_params, logical_axes

GiB = 1024**3
# name -> (memory per device in GiB, dense bf16 peak FLOP/s per device)
DEVICES: dict[str, tuple[float, float]] = {
    "v4": (32, 275e12), "v5e": (16, 197e12), "v5p": (95, 459e12), "v6e": (32, 918e12),
    "a100-40gb": (40, 312e12), "a100-80gb": (80, 312e12), "h100": (80, 989e12),
    "h200": (141, 989e12),
}
USABLE = 0.9  # XLA's own buffers, fragmentation: plan against 90% of the device's memory


@dataclasses.dataclass
class Plan:
    num_params: int
    params: int  # bytes per device
    grads: int
    opt_state: int
    activations: int
    flops_per_step: float

    @property
    def total(self) -> int:
        return self.params + self.grads + self.opt_state + self.activations


def sharded_param_bytes(cfg: ModelConfig, mesh: dict[str, int], rules: sharding.Rules,
                        itemsize: int) -> tuple[int, int]:
    """(parameter count, bytes of one device's shards at `itemsize` bytes per element)."""
    count, per_device = 0, 0
    for spec, x in zip(jax.tree.leaves(logical_axes(cfg), is_leaf=lambda s: isinstance(s, PartitionSpec)),
                       jax.tree.leaves(abstract_params(cfg)), strict=True):
        mesh_spec = sharding.logical_to_mesh_spec(tuple(spec), x.shape, rules, mesh)
        count += math.prod(x.shape)
        per_device += math.prod(sharding.per_device_shape(x.shape, mesh_spec, mesh)) * itemsize
    return count, per_device


def activation_bytes(cfg: ModelConfig, tokens: int, seq: int, tensor: int, remat: str,
                     itemsize: int) -> int:
    """Estimated peak activation bytes of one device for one micro-batch of `tokens` tokens.

    Saved per layer for the backward pass (elements per token): always the layer input (D);
    plus, by policy, `none`: every intermediate; `dots`: every matmul output (incl. attention
    scores); `dots_no_batch`: the projections (qkv, o, wi, wo); `qkv_proj`: qkv and o; `full`:
    nothing. On top: one layer's full working set (recomputed in the backward pass) and the
    f32 logits with their gradient.
    """
    D, F, Hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nh, kv = cfg.num_heads, cfg.num_kv_heads
    qkv = (nh + 2 * kv) * Hd / tensor
    keys = min(seq, cfg.sliding_window or seq)
    scores = nh * keys / tensor  # one row of scores/probs per query token
    attn_out, mlp_in = nh * Hd / tensor, 2 * F / tensor
    everything = (D + qkv + (nh + kv) * Hd / tensor + 3 * scores + attn_out + 4 * D + mlp_in
                  + 2 * F / tensor)
    saved = {
        "none": everything,
        "dots": qkv + scores + attn_out + mlp_in + 2 * D,
        "dots_no_batch": qkv + mlp_in + 2 * D,
        "qkv_proj": qkv + D,
        "full": 0.0,
    }[remat]
    per_layer = (D + saved) * tokens * itemsize
    working = everything * tokens * itemsize
    logits = tokens * cfg.vocab_size / tensor * (itemsize + 4 + 4)
    return int(cfg.num_layers * per_layer + working + logits)


def make_plan(cfg: ModelConfig, train_cfg: ConfigDict, mesh: dict[str, int],
              rules: sharding.Rules, seq: int) -> Plan:
    """The plan of training `cfg` with the `train` section's batch on `mesh` under `rules`."""
    global_batch, grad_accum = int(train_cfg.global_batch), int(train_cfg.grad_accum)
    sharding.check_batch(global_batch, grad_accum, mesh, rules)
    p_size = jnp.dtype(cfg.param_dtype).itemsize
    o_size = jnp.dtype(train_cfg.get("opt_state_dtype") or cfg.param_dtype).itemsize
    count, param_bytes = sharded_param_bytes(cfg, mesh, rules, 1)
    tokens = global_batch // grad_accum // sharding.batch_shards(mesh, rules) * seq
    acts = activation_bytes(cfg, tokens, seq, mesh["tensor"], cfg.remat_policy,
                            jnp.dtype(cfg.dtype).itemsize)
    return Plan(
        num_params=count, params=param_bytes * p_size,
        grads=param_bytes * p_size * (2 if grad_accum > 1 else 1),  # + accumulator
        opt_state=param_bytes * o_size * 2,  # Adam's two moments
        activations=acts, flops_per_step=flops_per_token(cfg, seq) * global_batch * seq)


USAGE = """usage: phased-jax plan (--config CONFIG_FILE | --preset NAME) [--config.SECTION.FIELD=VALUE ...]
                      [--num-devices N] [--device KIND] [--mfu F]"""


def _define_flags(fv) -> None:
    flags.DEFINE_enum("preset", None, sorted(PRESETS), "plan the default config with this model "
                      "(instead of --config)", flag_values=fv)
    flags.DEFINE_integer("num_devices", 0, "devices to plan for (default: this machine's)",
                         flag_values=fv)
    flags.DEFINE_enum("device", "v4", sorted(DEVICES), "device kind (memory and peak FLOP/s)",
                      flag_values=fv)
    flags.DEFINE_float("mfu", 0.4, "assumed MFU for the step time", flag_values=fv)


def preset_config(preset: str) -> ConfigDict:
    """The default config with `preset`'s model, remat `full` as the paper's configs."""
    c = get_default_config()
    c.model = model_section(preset, remat_policy="full")
    return c


def main(argv: list[str] | None = None) -> int:
    argv = [a.replace("--num-devices", "--num_devices") for a in (argv or [])]
    preset = flag_value(argv, "preset")
    if preset is not None and flag_value(argv, "config") is not None:
        raise UsageError("give --config or --preset, not both (override the config's model "
                         "with --config.model.FIELD=VALUE)")
    if preset is not None and preset not in PRESETS:
        raise UsageError(f"--preset {preset!r}: choose one of {', '.join(sorted(PRESETS))}")
    fv = parse_config_argv(argv, "phased-jax plan", USAGE + "\n\n" + __doc__.split("\n\n", 2)[2],
                           _define_flags, default=(lambda: preset_config(preset)) if preset else None,
                           sections=("model", "train"))
    if fv is None:
        return 0
    config = fv.config
    n_dev = fv.num_devices
    if n_dev <= 0:
        n_dev = jax.device_count()
        print(f"devices: {n_dev} (this machine's; give --num-devices N to plan for a pod)")
    mesh = sharding.mesh_sizes(config.mesh, n_dev)
    cfg = model_config(config.model)
    tc, seq = config.train, int(config.data.max_length)
    plan = make_plan(cfg, tc, mesh, sharding.rules_from_config(config.mesh), seq)
    mem_gib, peak = DEVICES[fv.device]
    step_s = plan.flops_per_step / (n_dev * peak * fv.mfu)
    gib = lambda b: f"{b / GiB:9.2f} GiB"
    print(f"model {config.model.get('preset', '')}: {plan.num_params:,} parameters; mesh {mesh} "
          f"({n_dev} devices)")
    print(f"batch {tc.global_batch} x {seq} tokens, grad_accum {tc.grad_accum}, remat "
          f"{cfg.remat_policy}, compute {cfg.dtype}, params {cfg.param_dtype}")
    print("per device:")
    print(f"  params       {gib(plan.params)}")
    print(f"  gradients    {gib(plan.grads)}")
    print(f"  optimizer    {gib(plan.opt_state)}   (AdamW mu + nu)")
    print(f"  activations  {gib(plan.activations)}   (estimate, remat={cfg.remat_policy})")
    print(f"  total        {gib(plan.total)}")
    fits = plan.total <= USABLE * mem_gib * GiB
    print(f"{fv.device} ({mem_gib:g} GiB): {'FITS' if fits else 'DOES NOT FIT'} "
          f"({plan.total / (mem_gib * GiB):.0%} of memory; plan against {USABLE:.0%})")
    print(f"step: {plan.flops_per_step:.3e} FLOPs -> {step_s:.2f} s at {fv.mfu:.0%} MFU "
          f"({tc.global_batch * seq / step_s:,.0f} tokens/s)")
    return 0 if fits else 3
