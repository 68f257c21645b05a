"""`phased-jax compile`: the experiment's exact train and eval steps, compiled for a TPU slice here.

    phased-jax compile --config configs/llama2_7b_phased.py --tpu v5p-16
    phased-jax compile --config configs/llama2_70b_phased.py --tpu v5p-128 \\
        --config.mesh.shape='(1,-1,8)'
    phased-jax compile --config C --tpu v5e-256 --slices 2      # two slices over DCN

libtpu's TPU compiler runs on any machine: the slice's devices are described, not attached
(`phased_jax.accelerators`), and the trainer the run would build is lowered and compiled for
them. XLA's buffer assignment then gives each device's arguments, outputs, temporaries and
peak, with the chip's HBM beside them and the analytic `phased-jax plan` estimate; a step that
does not fit fails to compile, and the shortfall is reported (exit 3). Sharding and shape
mistakes surface as config errors (exit 2) before a pod is booked.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import flax.linen as nn
import jax
from absl import flags
from jax.sharding import PartitionSpec
from ml_collections import ConfigDict

from phased_jax import sharding
from phased_jax.accelerators import TpuSlice, parse_tpu, tpu_devices
from phased_jax.config_cli import parse_config_argv
from phased_jax.errors import ConfigError, UsageError
from phased_jax.model.params import abstract_params, logical_axes
from phased_jax.train import plan as planner
from phased_jax.train.trainer import build_trainer

GiB = 1024**3
EXIT_DOES_NOT_FIT = 3
STEPS = ("train", "eval")


@dataclasses.dataclass
class StepMemory:
    """One compiled step's per-device memory in bytes (XLA's buffer assignment)."""

    name: str
    compile_s: float
    arguments: int = 0
    outputs: int = 0
    temporaries: int = 0
    peak: int = 0
    shortfall: str = ""  # the compiler's out-of-memory message when the step does not fit

    @property
    def fits(self) -> bool:
        return not self.shortfall


def replicated_dims(trainer) -> list[str]:
    """Parameter dims a rule names a mesh axis for but the axis does not divide: the rule
    table quietly replicates them (`sharding.logical_to_mesh_spec`); say so, as it costs memory."""
    sizes = sharding.mesh_axis_sizes(trainer.mesh)
    notes = []
    specs = jax.tree_util.tree_leaves_with_path(   # with LoRA: the base's and the adapters'
        logical_axes(trainer.model_cfg, trainer.lora), is_leaf=lambda x: isinstance(x, PartitionSpec))
    shapes = jax.tree.leaves(abstract_params(trainer.model_cfg, trainer.lora))
    for (path, spec), x in zip(specs, shapes, strict=True):
        mesh_axes = nn.logical_to_mesh_axes(tuple(spec), trainer.rules)
        for name, dim, axes in zip(spec, x.shape, mesh_axes, strict=True):
            names = sharding.rule_axes(axes, sizes)
            ways = math.prod(sizes[a] for a in names)
            if names and dim % ways:
                notes.append(f"{jax.tree_util.keystr(path, simple=True, separator='/')}: "
                             f"{name} = {dim} is not divisible by mesh {'x'.join(names)} = "
                             f"{ways}, so it is replicated (rule {name!r} in config.mesh.rules)")
    return notes


def _oom_message(err: Exception) -> str | None:
    """The compiler's out-of-memory line, with the shortfall worked out where it gives sizes."""
    text = str(err)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    line = next((ln for ln in text.splitlines() if "memory" in ln.lower()), text.splitlines()[0])
    line = re.sub(r"^.*?RESOURCE_EXHAUSTED:\s*", "", line).strip()
    sizes = [float(x) for x in re.findall(r"\(([\d.]+)G\)", line)]
    if len(sizes) == 2 and sizes[0] > sizes[1]:
        need, have = sizes
        line += f" Over by {need - have:.2f} GiB ({need / have:.1f}x the usable HBM)."
    return line


def compile_step(trainer, name: str, seq_len: int) -> StepMemory:
    """Lower and compile one step; memory from XLA, or the compiler's shortfall message."""
    t0 = time.perf_counter()
    try:
        lowered = trainer.lower(name, seq_len)
    except (ValueError, TypeError) as e:  # shapes and shardings the mesh cannot take
        raise ConfigError(f"the {name} step does not lower on this mesh: "
                          f"{str(e).splitlines()[0]}") from None
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 (XLA's runtime error type; anything else re-raised)
        message = _oom_message(e)
        if message is None:
            raise
        return StepMemory(name, time.perf_counter() - t0, shortfall=message)
    ma = compiled.memory_analysis()
    return StepMemory(
        name, time.perf_counter() - t0, arguments=ma.argument_size_in_bytes,
        outputs=ma.output_size_in_bytes,
        temporaries=ma.temp_size_in_bytes, peak=ma.peak_memory_in_bytes)


@dataclasses.dataclass
class CompileResult:
    """What `compile_for_tpu` found: per-step memory, the analytic plan, mesh and notes."""

    tpu: TpuSlice
    slices: int
    steps: list[StepMemory]
    plan: planner.Plan
    mesh: dict[str, int]
    notes: list[str]

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.steps)


def compile_for_tpu(config: ConfigDict, tpu: TpuSlice, slices: int = 1,
                    steps: tuple[str, ...] = STEPS) -> CompileResult:
    """Compile `steps` of `config` for `slices` slices of `tpu`, as `train` would build them."""
    devices = tpu_devices(tpu, slices)  # the mesh must span them (`sharding.make_mesh`)
    trainer = build_trainer(config, devices=devices)
    seq = int(config.data.max_length)
    mesh = sharding.mesh_axis_sizes(trainer.mesh)
    plan = planner.make_plan(trainer.model_cfg, config.train, mesh, trainer.rules, seq,
                             device=tpu.generation, lora=trainer.lora,
                             packing=bool(config.data.get("packing", False)))
    memories = [compile_step(trainer, name, seq) for name in steps]
    return CompileResult(tpu, slices, memories, plan, mesh, replicated_dims(trainer))


def report(config: ConfigDict, result: CompileResult) -> str:
    """The memory table: per device, each step beside the plan and the chip's HBM."""
    gib = lambda b: f"{b / GiB:10.2f}"
    m, tc, tpu, plan = config.model, config.train, result.tpu, result.plan
    slices = result.slices
    lines = [
        f"{tpu.name}{f' x {slices} slices' if slices > 1 else ''}: {tpu.chips * slices} chips "
        f"(topology {tpu.topology_name}), {tpu.hbm_gib:g} GiB HBM each; mesh {result.mesh}",
        f"model {m.get('preset', '') or 'custom'}: {plan.num_params:,} parameters; batch "
        f"{tc.global_batch} x {config.data.max_length}, grad_accum {tc.grad_accum}, remat "
        f"{m.remat_policy}, attention {m.attention_impl}, loss_chunk {tc.get('loss_chunk', 0)}",
        *([] if plan.lora is None else [
            f"LoRA rank {plan.lora.rank} on {','.join(plan.lora.targets)}: "
            f"{plan.trainable_params:,} trainable parameters; frozen base in "
            f"{getattr(plan.lora, 'base_qtype', '') or m.param_dtype}"]),
        *(f"note: {n}" for n in result.notes),
        "per device (GiB)" + "".join(f"{s.name:>11}" for s in result.steps) + "       plan",
    ]
    rows = [("arguments", plan.params + plan.opt_state), ("outputs", None),
            ("temporaries", plan.grads + plan.activations), ("peak", plan.total)]
    for attr, planned in rows:
        cells = "".join(gib(getattr(s, attr)) + " " if s.fits else f"{'-':>10} "
                        for s in result.steps)
        lines.append(f"  {attr:<14}{cells}{gib(planned) if planned is not None else ''}")
    for s in result.steps:
        if not s.fits:
            lines.append(f"{s.name}: DOES NOT FIT: {s.shortfall}")
    train = result.steps[0]
    if train.fits and train.name == "train" and train.peak:
        lines.append(f"plan vs XLA (train peak): {(plan.total - train.peak) / train.peak:+.1%}")
    worst = max((s.peak for s in result.steps if s.fits), default=0)
    lines.append(f"{tpu.generation} ({tpu.hbm_gib:g} GiB): " + (
        f"FITS (peak {worst / (tpu.hbm_gib * GiB):.0%} of HBM)" if result.fits else "DOES NOT FIT"))
    lines.append("compile: " + ", ".join(f"{s.name} {s.compile_s:.1f} s" for s in result.steps))
    return "\n".join(lines)


USAGE = """usage: phased-jax compile --config CONFIG_FILE --tpu ACCELERATOR [--slices K]
                         [--steps train,eval] [--config.SECTION.FIELD=VALUE ...]"""


def _define_flags(fv) -> None:
    flags.DEFINE_string("tpu", None, "Cloud TPU accelerator type to compile for: v4-N, "
                        "v5litepod-N / v5e-N, v5p-N, v6e-N (or GEN:AxBxC)", flag_values=fv)
    flags.DEFINE_integer("slices", 1, "slices over DCN (multi-slice)", flag_values=fv)
    flags.DEFINE_list("steps", list(STEPS), "steps to compile: train, eval", flag_values=fv)


def main(argv: list[str] | None = None) -> int:
    fv = parse_config_argv(list(argv or []), "phased-jax compile",
                           USAGE + "\n\n" + __doc__.split("\n\n", 2)[2], _define_flags,
                           sections=("model", "train"))
    if fv is None:
        return 0
    if not fv.tpu:
        raise UsageError("--tpu is required, e.g. --tpu v5p-16 (see phased-jax compile --help)")
    if fv.slices < 1:
        raise UsageError(f"--slices {fv.slices}: give 1 or more")
    bad = [s for s in fv.steps if s not in STEPS]
    if bad or not fv.steps:
        raise UsageError(f"--steps {','.join(fv.steps)}: choose from {', '.join(STEPS)}")
    tpu = parse_tpu(fv.tpu)
    try:
        result = compile_for_tpu(fv.config, tpu, fv.slices, tuple(fv.steps))
    except ConfigError as e:  # the mesh, batch or shapes: the user's config, exit 2
        raise UsageError(str(e)) from None
    print(report(fv.config, result))
    return 0 if result.fits else EXIT_DOES_NOT_FIT
