"""`phased-jax plan`: per-device memory and step time of a training config, before launching.

    phased-jax plan --config configs/llama2_7b_phased.py --num-devices 32 [--device v4]
    phased-jax plan --preset llama2-70b --num-devices 256 --config.mesh.shape='(1,-1,8)'

The plan reads the experiment's config: its model (shapes, precision, remat policy), mesh
shape and rule table, global batch, grad accumulation, optimizer-state dtype and data.max_length
(the sequence length). `--preset` alone plans the default config with that model (remat
`full`, as the paper's configs). Any field can be overridden as in `train`.

Parameter shapes come from `jax.eval_shape(model.init)` (nothing is allocated), per-device
bytes from the same logical->mesh rules the trainer shards with; activations are an analytic
estimate per remat policy, attention implementation and loss chunking (`activation_breakdown`
names each term; `phased-jax compile` checks the total against XLA's buffer assignment); step
time is FLOPs / (devices x peak x MFU).
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
from phased_jax.accelerators import DEVICES, GPU_KINDS
from phased_jax.config import get_default_config, model_config, model_section
from phased_jax.config_cli import flag_value, parse_config_argv
from phased_jax.errors import ConfigError, UsageError
from phased_jax.model.attention import resolve_attention_impl
from phased_jax.model.config import PRESETS, ModelConfig
from phased_jax.model.flops import flops_per_token, layer_param_count
from phased_jax.model.params import abstract_params, logical_axes

GiB = 1024**3
USABLE = 0.9  # XLA's own buffers, fragmentation: plan against 90% of the device's memory
FLASH_IMPLS = ("splash", "cudnn")  # kernels that never materialise the [L, keys] scores


@dataclasses.dataclass
class Plan:
    num_params: int
    params: int  # bytes per device
    grads: int
    opt_state: int
    activations: int
    flops_per_step: float
    activation_terms: dict[str, int] = dataclasses.field(default_factory=dict)
    peak_phase: str = "layers"  # which moment of the backward pass `activations` is

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


def is_flash(attention_impl: str, device: str | None = None, *, dtype: str = "bfloat16",
             packing: bool = False) -> bool:
    """Whether `model.attention_impl` runs a flash kernel (O(L) softmax stats per head, no
    [L, keys] scores) on `device` (a `DEVICES` kind; None: a TPU, the project's target).
    `auto` resolves as the trainer would on that platform (GPU: cudnn unless float32 or packing)."""
    platform = "gpu" if device in GPU_KINDS else "tpu"
    impl = resolve_attention_impl(attention_impl, platform, packing=packing, dtype=dtype,
                                  strict=False)
    return impl in FLASH_IMPLS


def activation_breakdown(cfg: ModelConfig, tokens: int, seq: int, tensor: int, remat: str,
                         itemsize: int, *, flash: bool = False, loss_chunk: int = 0
                         ) -> dict[str, int]:
    """Estimated peak activation bytes of one device for one micro-batch of `tokens` tokens
    (`tokens / seq` rows), by term; `peak_activations` picks the live ones at the peak.

    - `layer_inputs`: every layer's input (D per token), saved for the backward pass.
    - `policy_saved`: what the remat policy saves per layer besides (per token): `none`:
      everything; `dots`: every matmul output; `dots_no_batch`: the projections (qkv, o, wi, wo);
      `qkv_proj`: qkv and o; `full`: nothing. The attention scores are in `attention_scores`.
    - `layer_working`: one layer's working set, recomputed in the backward pass (no scores).
    - `attention_scores`: xla: per query token and head a row of `keys` probs in the compute
      dtype (XLA fuses the float32 softmax into its neighbours; with grouped kv heads their
      gradient product too) and float32 row statistics, in the working layer, and by
      `none`/`dots` in every layer. flash (`splash`/`cudnn`): the kernel keeps the scores in
      on-chip blocks and saves O(L) float32 softmax stats (logsumexp, max) per head instead.
    - `final_hidden`: the final-normed hidden states (the LM head's input) and their gradient;
      chunked loss adds their [chunks, rows, chunk, D] copy for the scan.
    - `logits`: every token's logits in the compute dtype and their float32 gradient (XLA fuses
      the float32 softmax into that gradient); with `loss_chunk` > 0 one chunk's (`rows x
      loss_chunk` tokens) only, whose gradient also has a compute-dtype copy for the head's
      matmuls.
    - `lm_head`: the LM head [D, vocab / tensor] all-gathered in the compute dtype and its
      float32 gradient before the reduction. Live at the loss; with `loss_chunk` > 0 also while
      going back through the layers: XLA schedules the loss's forward scan (it only feeds the
      reported loss) and the head gradient's reduction after the layers' backward pass (seen in
      the buffer assignment of Llama-3 8B and 70B on v5p). It matters for Llama-3's 128,256
      tokens: 3 GiB a device for 8B, 6 GiB for 70B.
    - `gathered_layer`: FSDP's working copy of one layer: its weights all-gathered in the
      compute dtype and its whole gradient in float32 before the reduce-scatter (per device,
      split by `tensor` only). Independent of the batch; it matters for 70B-wide layers.
    """
    D, F, Hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nh, kv = cfg.num_heads, cfg.num_kv_heads
    f32 = 4
    qkv = (nh + 2 * kv) * Hd / tensor
    attn_out, mlp_in = nh * Hd / tensor, 2 * F / tensor
    # elements per token (compute dtype): qkv, rope'd q and k, attention out, residual/norm
    # temporaries, gate+up and activation*up.
    working = D + qkv + (nh + kv) * Hd / tensor + attn_out + 4 * D + mlp_in + 2 * F / tensor
    saved = {
        "none": working,
        "dots": qkv + attn_out + mlp_in + 2 * D,
        "dots_no_batch": qkv + mlp_in + 2 * D,
        "qkv_proj": qkv + D,
        "full": 0.0,
    }[remat]
    keys = min(seq, cfg.sliding_window or seq)
    if flash:  # bytes per token: the kernel's float32 logsumexp and max per head
        scores_working = 2 * nh / tensor * f32
        scores_saved = scores_working if remat in ("none", "dots") else 0.0
    else:
        row = nh * keys / tensor  # one row of scores per query token and head
        # XLA fuses the float32 softmax into its neighbours: the probs in the compute dtype
        # are what stays live; with grouped kv heads (a [.., kv, group, L, keys] einsum) their
        # gradient product in the compute dtype stays live beside them (XLA's buffer assignment
        # of Llama-3 8B on v5p; Llama-2 7B, Mistral 7B, 70B: benchmarks/tpu_compile.py).
        per_score = itemsize * (2 if kv < nh else 1)
        scores_working = row * per_score + 2 * nh / tensor * f32
        scores_saved = {"none": scores_working, "dots": row * itemsize}.get(remat, 0.0)
    rows = max(1, tokens // seq)
    chunk = min(loss_chunk, seq) if loss_chunk > 0 else seq
    L = cfg.num_layers
    return {
        "layer_inputs": int(L * tokens * D * itemsize),
        "policy_saved": int(L * tokens * saved * itemsize),
        "layer_working": int(tokens * working * itemsize),
        "attention_scores": int(tokens * (L * scores_saved + scores_working)),
        "final_hidden": int(tokens * D * itemsize * (3 if loss_chunk > 0 else 2)),
        "logits": int(rows * chunk * cfg.vocab_size / tensor
                      * (itemsize * (2 if loss_chunk > 0 else 1) + f32)),
        "lm_head": int(cfg.hidden_size * cfg.vocab_size / tensor * (itemsize + f32)),
        "gathered_layer": int(layer_param_count(cfg) / tensor * (itemsize + f32)),
    }


LAYER_PHASE = ("layer_inputs", "policy_saved", "layer_working", "attention_scores", "final_hidden",
               "gathered_layer")
LOSS_PHASE = ("layer_inputs", "policy_saved", "final_hidden", "logits", "lm_head")


def live_terms(phase: str, loss_chunk: int = 0) -> tuple[str, ...]:
    """The terms live at `phase` (`layers` or `loss`): with a chunked loss the gathered head and
    its gradient stay live through the layers too (`activation_breakdown`'s `lm_head`)."""
    if phase == "loss":
        return LOSS_PHASE
    return LAYER_PHASE + (("lm_head",) if loss_chunk > 0 else ())


def peak_activations(terms: dict[str, int], grads: int = 0, loss_chunk: int = 0
                     ) -> tuple[int, str]:
    """(peak bytes, phase) of the backward pass: the larger of two moments, not the sum.

    - `layers`: going back through the layers, every saved input and policy residual, one
      layer's recomputed working set with its attention scores, while the gradients fill in
      (counted in `Plan.grads`); with `loss_chunk` > 0 the gathered LM head and its gradient;
    - `loss`: the LM head and cross-entropy before any layer gradient exists, so the
      gradients' bytes are not yet live: subtract them (`grads`).
    The two never overlap, so summing them would overstate the peak by the logits (as XLA's
    buffer assignment shows for Llama-2 7B on v5p: chunking the loss leaves its peak unchanged).
    """
    layers = sum(terms[k] for k in live_terms("layers", loss_chunk))
    loss = sum(terms[k] for k in live_terms("loss", loss_chunk)) - grads
    return (layers, "layers") if layers >= loss else (loss, "loss")


def activation_bytes(cfg: ModelConfig, tokens: int, seq: int, tensor: int, remat: str,
                     itemsize: int, *, flash: bool = False, loss_chunk: int = 0) -> int:
    """Estimated peak activation bytes of one device for one micro-batch of `tokens` tokens
    (`peak_activations` of `activation_breakdown`'s terms, gradients aside)."""
    return peak_activations(activation_breakdown(cfg, tokens, seq, tensor, remat, itemsize,
                                                 flash=flash, loss_chunk=loss_chunk),
                            loss_chunk=loss_chunk)[0]


def make_plan(cfg: ModelConfig, train_cfg: ConfigDict, mesh: dict[str, int],
              rules: sharding.Rules, seq: int, *, device: str | None = None,
              packing: bool = False) -> Plan:
    """The plan of training `cfg` with the `train` section's batch (and `loss_chunk`) on `mesh`
    under `rules`; `device` (a `DEVICES` kind) and `packing` decide what `attention_impl='auto'`
    runs (`is_flash`)."""
    global_batch, grad_accum = int(train_cfg.global_batch), int(train_cfg.grad_accum)
    sharding.check_batch(global_batch, grad_accum, mesh, rules)
    p_size = jnp.dtype(cfg.param_dtype).itemsize
    o_size = jnp.dtype(train_cfg.get("opt_state_dtype") or cfg.param_dtype).itemsize
    count, param_bytes = sharded_param_bytes(cfg, mesh, rules, 1)
    tokens = global_batch // grad_accum // sharding.batch_shards(mesh, rules) * seq
    loss_chunk = int(train_cfg.get("loss_chunk", 0))
    terms = activation_breakdown(
        cfg, tokens, seq, mesh["tensor"], cfg.remat_policy, jnp.dtype(cfg.dtype).itemsize,
        flash=is_flash(cfg.attention_impl, device, dtype=cfg.dtype, packing=packing),
        loss_chunk=loss_chunk)
    grads = param_bytes * p_size * (2 if grad_accum > 1 else 1)  # + accumulator
    activations, phase = peak_activations(terms, grads, loss_chunk)
    return Plan(
        num_params=count, params=param_bytes * p_size, grads=grads,
        opt_state=param_bytes * o_size * 2,  # Adam's two moments
        activations=activations, activation_terms=terms, peak_phase=phase,
        flops_per_step=flops_per_token(cfg, seq) * global_batch * seq)


def suggest_mesh(cfg: ModelConfig, train_cfg: ConfigDict, num_devices: int,
                 rules: sharding.Rules, seq: int, memory_bytes: float, *,
                 device: str | None = None, packing: bool = False
                 ) -> tuple[tuple[int, int, int], Plan] | None:
    """The mesh (1, fsdp, tensor) with the fewest tensor-parallel ways (1, 2, 4, ... up to the
    kv heads) whose plan fits `memory_bytes`, or None. Fewest, because tensor parallelism adds
    collectives inside every layer while FSDP's all-gathers overlap the layers' compute once
    each device has a few thousand tokens a step."""
    tensor = 1
    while tensor <= cfg.num_kv_heads and num_devices % tensor == 0:
        mesh = {"data": 1, "fsdp": num_devices // tensor, "tensor": tensor}
        try:
            plan = make_plan(cfg, train_cfg, mesh, rules, seq, device=device, packing=packing)
        except ConfigError:  # the batch does not split over this many fsdp shards
            plan = None
        if plan is not None and plan.total <= memory_bytes:
            return (1, num_devices // tensor, tensor), plan
        tensor *= 2
    return None


USAGE = """usage: phased-jax plan (--config CONFIG_FILE | --preset NAME) [--config.SECTION.FIELD=VALUE ...]
                      [--num-devices N] [--device KIND] [--mfu F]"""


DEFAULT_DEVICE = "v4"


def _define_flags(fv) -> None:
    flags.DEFINE_enum("preset", None, sorted(PRESETS), "plan the default config with this model "
                      "(instead of --config)", flag_values=fv)
    flags.DEFINE_integer("num_devices", 0, "devices to plan for (default: this machine's)",
                         flag_values=fv)
    flags.DEFINE_enum("device", None, sorted(DEVICES), "device kind (memory and peak FLOP/s); "
                      f"default {DEFAULT_DEVICE}, said in the output", flag_values=fv)
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
    device = fv.device
    if device is None:
        device = DEFAULT_DEVICE
        mem_gib = DEVICES[device][0]
        print(f"device: {device} ({mem_gib:g} GiB), assumed; give --device KIND to plan for "
              f"another ({', '.join(sorted(DEVICES))})")
    n_dev = fv.num_devices
    if n_dev <= 0:
        n_dev = jax.device_count()
        print(f"devices: {n_dev} (this machine's; give --num-devices N to plan for a pod)")
    mesh = sharding.mesh_sizes(config.mesh, n_dev)
    cfg = model_config(config.model)
    tc, seq = config.train, int(config.data.max_length)
    plan = make_plan(cfg, tc, mesh, sharding.rules_from_config(config.mesh), seq, device=device,
                     packing=bool(config.data.get("packing", False)))
    mem_gib, peak = DEVICES[device]
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
    flash = is_flash(cfg.attention_impl, device, dtype=cfg.dtype,
                     packing=bool(config.data.get("packing", False)))
    print(f"  activations  {gib(plan.activations)}   (estimate, remat={cfg.remat_policy}, "
          f"attention {cfg.attention_impl} ({'flash' if flash else 'scores materialised'}), "
          f"loss_chunk {int(tc.get('loss_chunk', 0))})")
    live = live_terms(plan.peak_phase, int(tc.get("loss_chunk", 0)))
    print(f"    at the peak ({'going back through the layers' if plan.peak_phase == 'layers' else 'the loss, before layer gradients'}):")
    for name, value in plan.activation_terms.items():
        print(f"    {name:<16} {gib(value)}{'' if name in live else '   (not live at the peak)'}")
    print(f"  total        {gib(plan.total)}")
    fits = plan.total <= USABLE * mem_gib * GiB
    print(f"{device} ({mem_gib:g} GiB): {'FITS' if fits else 'DOES NOT FIT'} "
          f"({plan.total / (mem_gib * GiB):.0%} of memory; plan against {USABLE:.0%})")
    suggestion = suggest_mesh(cfg, tc, n_dev, sharding.rules_from_config(config.mesh), seq,
                              USABLE * mem_gib * GiB, device=device,
                              packing=bool(config.data.get("packing", False)))
    if suggestion is None:
        print("no mesh (1, fsdp, tensor) fits: use more devices, train.grad_accum, "
              "train.loss_chunk, model.remat_policy='full' or attention_impl='auto'")
    elif suggestion[0] != tuple(mesh.values()):
        shape, other = suggestion
        print(f"suggested mesh: --config.mesh.shape='(1,-1,{shape[2]})' (fsdp {shape[1]} x tensor "
              f"{shape[2]}): {gib(other.total).strip()} per device, the least tensor parallelism "
              f"that fits")
    print(f"step: {plan.flops_per_step:.3e} FLOPs -> {step_s:.2f} s at {fv.mfu:.0%} MFU "
          f"({tc.global_batch * seq / step_s:,.0f} tokens/s)")
    return 0 if fits else 3
