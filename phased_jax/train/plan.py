"""`phased-jax plan`: per-device memory and step time of a training config, before launching.

    phased-jax plan --config configs/llama2_7b_phased.py --num-devices 32 [--device v4]
    phased-jax plan --preset llama2-70b --num-devices 256 --config.mesh.shape='(1,-1,8)'

The plan reads the experiment's config: its model (shapes, precision, remat policy, LoRA),
mesh shape and rule table, global batch, grad accumulation, optimizer-state dtype and
data.max_length (the sequence length). `--preset` alone plans the default config with that model (remat
`full`, as the paper's configs). Any field can be overridden as in `train`.

Parameter shapes come from `jax.eval_shape(model.init)` (nothing is allocated), per-device
bytes from the same logical->mesh rules the trainer shards with; activations are an analytic
estimate per remat policy, attention implementation and loss chunking (`activation_breakdown`
names each term; `phased-jax compile` checks the total against XLA's buffer assignment); step
time is FLOPs / (devices x peak x MFU).

With LoRA (`model.lora.rank` > 0) the base is frozen in its storage form (`model.param_dtype`,
or QLoRA's int8/nf4 codes with a float32 absmax per block of 64) and has no gradient or
optimizer state; the adapters (float32) carry both. The activations keep every term of full
fine-tuning but the base's gradients: the gathered layer is the base's layer in flight (with
QLoRA its codes and the dequantised weights in the compute dtype) and the LM head has no
gradient.
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
from phased_jax.model.lora import LoraSpec, shapes, spec_from_section
from phased_jax.model.params import abstract_params, logical_axes
from phased_jax.model.quant import bytes_per_weight

GiB = 1024**3
USABLE = 0.9  # XLA's own buffers, fragmentation: plan against 90% of the device's memory
FLASH_IMPLS = ("splash", "cudnn")  # kernels that never materialise the [L, keys] scores
# A frozen base stored unquantised reaches the step in the default layout, in which the fused
# projections qkv [L, D, K, G+2, H] and wi [L, D, 2, F] keep the small G+2 and 2 axes among the
# minor ones; XLA relays both stacks out (D minor) once, before the layers, and keeps that copy
# through the step (the buffer assignment of Llama-2 70B LoRA on v5p-8: 20.7 GiB a chip).
RELAID = ("qkv", "wi")


@dataclasses.dataclass
class Plan:
    num_params: int  # the model's (with LoRA: the base's; the adapters are trainable_params)
    params: int  # bytes per device (with LoRA: the frozen base and the adapters)
    grads: int
    opt_state: int
    activations: int
    flops_per_step: float
    activation_terms: dict[str, int] = dataclasses.field(default_factory=dict)
    peak_phase: str = "layers"  # which moment of the backward pass `activations` is
    trainable_params: int = 0  # parameters with a gradient (num_params without LoRA)
    base: int = 0  # LoRA: bytes per device of the frozen base, in `params` (0 without)
    lora: LoraSpec | None = None

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


@dataclasses.dataclass
class ParamBytes:
    """Parameter counts and one device's bytes of them, frozen base and trainable apart."""

    count: int  # the model's parameters (a quantised weight counts its weights; no adapters)
    trainable_count: int
    base: int  # bytes per device of the frozen base in its storage form (0 without LoRA)
    trainable: int  # bytes per device of what trains (everything without LoRA)
    relaid: int = 0  # LoRA: bytes per device of the frozen fused projections (`RELAID`)


def _is_adapter(path) -> bool:
    return any(str(getattr(k, "key", "")).startswith("lora_") for k in path)


def param_bytes(cfg: ModelConfig, mesh: dict[str, int], rules: sharding.Rules,
                lora: LoraSpec | None = None) -> ParamBytes:
    """Counts and per-device bytes of the params the trainer holds, from their real shapes.

    Without LoRA everything trains, stored in `param_dtype`. With LoRA the adapters train in
    float32 and the base is frozen in its storage form: floating weights in `param_dtype`
    (the trainer casts the base to it), QLoRA's codes and absmax as `abstract_params` gives them.
    """
    p_size = jnp.dtype(cfg.param_dtype).itemsize
    specs = jax.tree.leaves(logical_axes(cfg, lora), is_leaf=lambda s: isinstance(s, PartitionSpec))
    leaves = jax.tree_util.tree_leaves_with_path(abstract_params(cfg, lora))
    nf4 = lora is not None and lora.base_qtype == "nf4"
    out = ParamBytes(0, 0, 0, 0)
    for spec, (path, x) in zip(specs, leaves, strict=True):
        mesh_spec = sharding.logical_to_mesh_spec(tuple(spec), x.shape, rules, mesh)
        elems = math.prod(sharding.per_device_shape(x.shape, mesh_spec, mesh))
        name = str(getattr(path[-1], "key", ""))
        if lora is not None and _is_adapter(path):
            out.trainable_count += math.prod(x.shape)
            out.trainable += elems * jnp.dtype(x.dtype).itemsize
            continue
        # QLoRA's codes (integers) and absmax (float32) as stored; other weights in param_dtype
        as_is = name.endswith("_absmax") or not jnp.issubdtype(x.dtype, jnp.floating)
        itemsize = jnp.dtype(x.dtype).itemsize if as_is else p_size
        if not name.endswith("_absmax"):  # absmax is no parameter of the model
            out.count += math.prod(x.shape) * (2 if nf4 and name.endswith("_q") else 1)
        if lora is None:
            out.trainable_count += math.prod(x.shape)
            out.trainable += elems * itemsize
        else:
            out.base += elems * itemsize
            out.relaid += elems * itemsize if name in RELAID else 0
    return out


def layer_storage_bytes(cfg: ModelConfig, lora: LoraSpec | None = None) -> float:
    """Bytes of one decoder layer's frozen weights as stored (LoRA's base): the projections in
    `param_dtype` or QLoRA's codes + absmax, the norms in `param_dtype`."""
    p_size = jnp.dtype(cfg.param_dtype).itemsize
    norms = 2 * cfg.hidden_size
    qtype = lora.base_qtype if lora is not None else ""
    proj = layer_param_count(cfg) - norms
    return proj * (bytes_per_weight(qtype) if qtype else p_size) + norms * p_size


def adapter_layer_count(cfg: ModelConfig, lora: LoraSpec) -> int:
    """Adapter parameters (A and B of every target) of one layer."""
    return sum(math.prod(s) for t in lora.targets for s, _ in shapes(cfg, t, lora.rank))


def lora_flops_per_token(cfg: ModelConfig, seq: int, lora: LoraSpec) -> float:
    """Training FLOPs per token with a frozen base: full fine-tuning's less the weight
    gradients of the base's projections and LM head, plus the adapters' three matmuls."""
    proj = layer_param_count(cfg) - 2 * cfg.hidden_size
    base_weight_grads = 2 * (cfg.num_layers * proj + cfg.hidden_size * cfg.vocab_size)
    return (flops_per_token(cfg, seq) - base_weight_grads
            + 3 * 2 * cfg.num_layers * adapter_layer_count(cfg, lora))


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
                         itemsize: int, *, flash: bool = False, loss_chunk: int = 0,
                         lora: LoraSpec | None = None, relaid: int = 0) -> dict[str, int]:
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
      With LoRA the base has no gradient: its layer gathered in the compute dtype (QLoRA: its
      codes and absmax as stored, and the layer dequantised to the compute dtype, one layer's
      weights in flight), and the adapters' layer in float32 with its float32 gradient.
    - with LoRA, `lm_head` is the gathered head alone (frozen: no gradient).
    - `base_relayout` (LoRA, unquantised base): XLA's copy of the frozen qkv and wi stacks in
      another layout, `relaid` bytes (`ParamBytes.relaid`), live through the step (`RELAID`).
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
    head = cfg.hidden_size * cfg.vocab_size / tensor
    if lora is None:
        lm_head = head * (itemsize + f32)
        gathered = layer_param_count(cfg) / tensor * (itemsize + f32)
    else:
        lm_head = head * itemsize
        gathered = (layer_param_count(cfg) * itemsize + adapter_layer_count(cfg, lora) * 2 * f32
                    ) / tensor
        if lora.base_qtype:
            gathered += layer_storage_bytes(cfg, lora) / tensor
    return {
        "layer_inputs": int(L * tokens * D * itemsize),
        "policy_saved": int(L * tokens * saved * itemsize),
        "layer_working": int(tokens * working * itemsize),
        "attention_scores": int(tokens * (L * scores_saved + scores_working)),
        "final_hidden": int(tokens * D * itemsize * (3 if loss_chunk > 0 else 2)),
        "logits": int(rows * chunk * cfg.vocab_size / tensor
                      * (itemsize * (2 if loss_chunk > 0 else 1) + f32)),
        "lm_head": int(lm_head),
        "gathered_layer": int(gathered),
        "base_relayout": int(relaid),
    }


LAYER_PHASE = ("layer_inputs", "policy_saved", "layer_working", "attention_scores", "final_hidden",
               "gathered_layer", "base_relayout")
LOSS_PHASE = ("layer_inputs", "policy_saved", "final_hidden", "logits", "lm_head", "base_relayout")


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
                     itemsize: int, *, flash: bool = False, loss_chunk: int = 0,
                     lora: LoraSpec | None = None) -> int:
    """Estimated peak activation bytes of one device for one micro-batch of `tokens` tokens
    (`peak_activations` of `activation_breakdown`'s terms, gradients aside)."""
    return peak_activations(activation_breakdown(cfg, tokens, seq, tensor, remat, itemsize,
                                                 flash=flash, loss_chunk=loss_chunk, lora=lora),
                            loss_chunk=loss_chunk)[0]


def make_plan(cfg: ModelConfig, train_cfg: ConfigDict, mesh: dict[str, int],
              rules: sharding.Rules, seq: int, *, device: str | None = None,
              packing: bool = False, lora: LoraSpec | None = None) -> Plan:
    """The plan of training `cfg` with the `train` section's batch (and `loss_chunk`) on `mesh`
    under `rules`; `device` (a `DEVICES` kind) and `packing` decide what `attention_impl='auto'`
    runs (`is_flash`). With `lora` the base is frozen (its bytes in `Plan.base`) and only the
    float32 adapters have gradients and AdamW moments."""
    global_batch, grad_accum = int(train_cfg.global_batch), int(train_cfg.grad_accum)
    sharding.check_batch(global_batch, grad_accum, mesh, rules)
    pb = param_bytes(cfg, mesh, rules, lora)
    # what trains is stored in param_dtype, or float32 (LoRA's adapters); Adam's mu in
    # train.opt_state_dtype (default: the trainable params'), nu as the params
    t_dtype = jnp.dtype("float32" if lora is not None else cfg.param_dtype)
    t_size, mu_size = t_dtype.itemsize, jnp.dtype(train_cfg.get("opt_state_dtype") or t_dtype).itemsize
    tokens = global_batch // grad_accum // sharding.batch_shards(mesh, rules) * seq
    loss_chunk = int(train_cfg.get("loss_chunk", 0))
    terms = activation_breakdown(
        cfg, tokens, seq, mesh["tensor"], cfg.remat_policy, jnp.dtype(cfg.dtype).itemsize,
        flash=is_flash(cfg.attention_impl, device, dtype=cfg.dtype, packing=packing),
        loss_chunk=loss_chunk, lora=lora, relaid=pb.relaid)
    grads = pb.trainable * (2 if grad_accum > 1 else 1)  # + accumulator
    activations, phase = peak_activations(terms, grads, loss_chunk)
    per_token = (flops_per_token(cfg, seq) if lora is None
                 else lora_flops_per_token(cfg, seq, lora))
    return Plan(
        num_params=pb.count, params=pb.base + pb.trainable, grads=grads,
        opt_state=pb.trainable // t_size * (mu_size + t_size),  # Adam's two moments
        activations=activations, activation_terms=terms, peak_phase=phase,
        flops_per_step=per_token * global_batch * seq, trainable_params=pb.trainable_count,
        base=pb.base, lora=lora)


def suggest_mesh(cfg: ModelConfig, train_cfg: ConfigDict, num_devices: int,
                 rules: sharding.Rules, seq: int, memory_bytes: float, *,
                 device: str | None = None, packing: bool = False,
                 lora: LoraSpec | None = None) -> tuple[tuple[int, int, int], Plan] | None:
    """The mesh (1, fsdp, tensor) with the fewest tensor-parallel ways (1, 2, 4, ... up to the
    kv heads) whose plan fits `memory_bytes`, or None. Fewest, because tensor parallelism adds
    collectives inside every layer while FSDP's all-gathers overlap the layers' compute once
    each device has a few thousand tokens a step."""
    tensor = 1
    while tensor <= cfg.num_kv_heads and num_devices % tensor == 0:
        mesh = {"data": 1, "fsdp": num_devices // tensor, "tensor": tensor}
        try:
            plan = make_plan(cfg, train_cfg, mesh, rules, seq, device=device, packing=packing,
                             lora=lora)
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
    lora = spec_from_section(config.model.get("lora"))
    plan = make_plan(cfg, tc, mesh, sharding.rules_from_config(config.mesh), seq, device=device,
                     packing=bool(config.data.get("packing", False)), lora=lora)
    mem_gib, peak = DEVICES[device]
    step_s = plan.flops_per_step / (n_dev * peak * fv.mfu)
    gib = lambda b: f"{b / GiB:9.2f} GiB"
    print(f"model {config.model.get('preset', '')}: {plan.num_params:,} parameters; mesh {mesh} "
          f"({n_dev} devices)")
    print(f"batch {tc.global_batch} x {seq} tokens, grad_accum {tc.grad_accum}, remat "
          f"{cfg.remat_policy}, compute {cfg.dtype}, params {cfg.param_dtype}")
    if lora is not None:
        qtype = lora.base_qtype
        print(f"LoRA rank {lora.rank} on {','.join(lora.targets)}: {plan.trainable_params:,} "
              f"trainable parameters (float32); base frozen in "
              f"{qtype + ' (QLoRA)' if qtype else cfg.param_dtype}")
    print("per device:")
    if lora is None:
        print(f"  params       {gib(plan.params)}")
    else:
        print(f"  params       {gib(plan.params)}   (frozen base {gib(plan.base).strip()}, "
              f"adapters {gib(plan.params - plan.base).strip()})")
    print(f"  gradients    {gib(plan.grads)}{'   (adapters only)' if lora else ''}")
    print(f"  optimizer    {gib(plan.opt_state)}   (AdamW mu + nu{', adapters only' if lora else ''})")
    flash = is_flash(cfg.attention_impl, device, dtype=cfg.dtype,
                     packing=bool(config.data.get("packing", False)))
    print(f"  activations  {gib(plan.activations)}   (estimate, remat={cfg.remat_policy}, "
          f"attention {cfg.attention_impl} ({'flash' if flash else 'scores materialised'}), "
          f"loss_chunk {int(tc.get('loss_chunk', 0))})")
    live = live_terms(plan.peak_phase, int(tc.get("loss_chunk", 0)))
    print(f"    at the peak ({'going back through the layers' if plan.peak_phase == 'layers' else 'the loss, before layer gradients'}):")
    for name, value in plan.activation_terms.items():
        if name == "base_relayout" and not value:
            continue
        print(f"    {name:<16} {gib(value)}{'' if name in live else '   (not live at the peak)'}")
    print(f"  total        {gib(plan.total)}")
    fits = plan.total <= USABLE * mem_gib * GiB
    print(f"{device} ({mem_gib:g} GiB): {'FITS' if fits else 'DOES NOT FIT'} "
          f"({plan.total / (mem_gib * GiB):.0%} of memory; plan against {USABLE:.0%})")
    suggestion = suggest_mesh(cfg, tc, n_dev, sharding.rules_from_config(config.mesh), seq,
                              USABLE * mem_gib * GiB, device=device,
                              packing=bool(config.data.get("packing", False)), lora=lora)
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
