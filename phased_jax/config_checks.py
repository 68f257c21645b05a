"""Validation of an experiment config: each mistake is one line naming the field and the fix.

Run where a config is parsed (`config_cli.parse_config_argv`), so a mistake costs a second,
not the hour of compiling and data loading that comes before a pod's first step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from ml_collections import ConfigDict

from phased_jax.config import lora_section, model_config
from phased_jax.data.phases import check_order, single_phase
from phased_jax.data.records import FORMATS
from phased_jax.data.templates import TEMPLATES
from phased_jax.errors import ConfigError
from phased_jax.model.lora import QTYPES, parse_targets
from phased_jax.model.quant import check_divisible
from phased_jax.train import tracking
from phased_jax.train.optimizer import SCHEDULE_SCOPES, SCHEDULES


def _fix(path: str) -> str:
    return f"; fix it in the config file or override it with --config.{path}=VALUE"


_ABSENT = object()
# Fields every run reads; the others are checked only where a config has them.
_REQUIRED = {"train.global_batch", "train.grad_accum", "train.epochs_per_phase", "train.lr",
             "train.warmup_ratio", "train.schedule", "data.paths", "data.format",
             "data.on_invalid", "data.template", "data.max_length", "data.quantiles",
             "data.thresholds", "data.order"}


def _field(config: ConfigDict, path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, ConfigDict) or part not in node:
            if path not in _REQUIRED:
                return _ABSENT
            raise ConfigError(f"the config has no field {path}; start the config file from "
                              "phased_jax.config.get_default_config()")
        node = node[part]
    return node


def _number(config: ConfigDict, path: str, ok: Callable[[float], bool], want: str,
            integer: bool = False) -> Any:
    value = _field(config, path)
    if value is _ABSENT:
        return value
    kinds = int if integer else (int, float)
    if (isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value)
            or not ok(value)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{path}={value!r} is invalid: it must be {kind} {want}{_fix(path)}")
    return value


def _choice(config: ConfigDict, path: str, allowed: Sequence[str]) -> Any:
    value = _field(config, path)
    if value is not _ABSENT and value not in allowed:
        raise ConfigError(f"{path}={value!r} is invalid: choose one of "
                          f"{', '.join(map(repr, allowed))}{_fix(path)}")
    return value


DTYPES = ("float32", "bfloat16", "float16")


SECTIONS = ("train", "data", "model", "checkpoint", "export")


def validate_config(config: ConfigDict, sections: Sequence[str] = SECTIONS) -> None:
    """Raise a ConfigError naming the first invalid field of `sections`, its value and the fix.

    It checks what the config alone decides; what needs the data (an empty phase) or the
    devices (the batch over the mesh) is checked as soon as those are known:
    `data.pipeline.prepare` and `sharding.check_batch` (Trainer construction), both before the
    first step. Subcommands that read no data (`plan`, `generate`) check only their sections.
    """
    for name in sections:
        _CHECKS[name](config)


def _check_train(c: ConfigDict) -> None:
    batch = _number(c, "train.global_batch", lambda v: v >= 1, ">= 1", integer=True)
    accum = _number(c, "train.grad_accum", lambda v: v >= 1, ">= 1", integer=True)
    if batch % accum:
        raise ConfigError(f"train.global_batch={batch} is not divisible by train.grad_accum="
                          f"{accum}: each of the {accum} micro-batches must have the same size; "
                          "change --config.train.global_batch or --config.train.grad_accum")
    _number(c, "train.epochs_per_phase", lambda v: v >= 1, ">= 1", integer=True)
    _number(c, "train.max_steps_per_phase", lambda v: v == -1 or v >= 1,
            ">= 1, or -1 for no cap (epochs decide)", integer=True)
    _number(c, "train.lr", lambda v: v > 0, "> 0 (the peak learning rate)")
    _number(c, "train.warmup_ratio", lambda v: 0 <= v <= 1,
            "in [0, 1] (the fraction of each phase's steps spent warming up)")
    _choice(c, "train.schedule", SCHEDULES)
    _choice(c, "train.schedule_scope", SCHEDULE_SCOPES)
    _number(c, "train.min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]")
    _number(c, "train.weight_decay", lambda v: v >= 0, ">= 0")
    _number(c, "train.b1", lambda v: 0 <= v < 1, "in [0, 1)")
    _number(c, "train.b2", lambda v: 0 <= v < 1, "in [0, 1)")
    _number(c, "train.eps", lambda v: v > 0, "> 0")
    _number(c, "train.clip_norm", lambda v: v >= 0, ">= 0 (0 = no clipping)")
    _number(c, "train.z_loss", lambda v: v >= 0, ">= 0")
    _number(c, "train.loss_chunk", lambda v: v >= 0,
            ">= 0 (positions per loss chunk; 0 = the whole sequence at once)", integer=True)
    _number(c, "train.log_every", lambda v: v >= 1, ">= 1", integer=True)
    _number(c, "train.eval_every", lambda v: v >= 0, ">= 0 (0 = at each phase end)", integer=True)
    _choice(c, "train.opt_state_dtype", ("", *DTYPES))
    _check_wandb(c)


def _check_wandb(c: ConfigDict) -> None:
    """`train.wandb`: strings and a tuple of tags; wandb installed when a project asks for it."""
    for name in ("project", "entity", "name"):
        value = _field(c, f"train.wandb.{name}")
        if value is not _ABSENT and not isinstance(value, str):
            raise ConfigError(f"train.wandb.{name}={value!r} is invalid: it must be a string"
                              + _fix(f"train.wandb.{name}"))
    tags = _field(c, "train.wandb.tags")
    if tags is not _ABSENT and (isinstance(tags, str) or not isinstance(tags, tuple | list)
                                or not all(isinstance(t, str) and t for t in tags)):
        raise ConfigError(f"train.wandb.tags={tags!r} is invalid: it must be a tuple of "
                          "non-empty strings such as ('llama3', 'phased')"
                          + _fix("train.wandb.tags"))
    _choice(c, "train.wandb.mode", tracking.MODES)
    if tracking.enabled(c) and not tracking.installed():
        raise ConfigError(f"train.wandb.project={c.train.wandb.project!r} asks for Weights & "
                          f"Biases but wandb is not installed: {tracking.INSTALL} (or set "
                          "--config.train.wandb.project='' to run without it)")


def _check_data(c: ConfigDict) -> None:
    paths = _field(c, "data.paths")
    if (isinstance(paths, str) or not isinstance(paths, tuple | list) or not paths
            or not all(isinstance(p, str) and p for p in paths)):
        raise ConfigError(f"data.paths={paths!r} is invalid: it must be a non-empty tuple of "
                          "files, directories or HF dataset names" + _fix("data.paths"))
    _choice(c, "data.format", FORMATS)
    _choice(c, "data.on_invalid", ("error", "skip"))
    _choice(c, "data.template", TEMPLATES)
    _number(c, "data.max_length", lambda v: v >= 2, ">= 2 (a prompt token and a target token)",
            integer=True)
    _number(c, "data.max_record_bytes", lambda v: v >= 1, ">= 1", integer=True)
    _number(c, "data.eval_fraction", lambda v: 0 <= v < 1, "in [0, 1)")
    replay = _number(c, "data.replay", lambda v: v >= 0,
                     ">= 0 (examples replayed per example of a later phase; 0 = none)")
    quantiles = _number(c, "data.quantiles", lambda v: v >= 0,
                        ">= 0 (0 = stages by data.thresholds)", integer=True)
    thresholds = _field(c, "data.thresholds")
    if (not isinstance(thresholds, tuple | list)
            or not all(isinstance(t, int | float) and not isinstance(t, bool) for t in thresholds)):
        raise ConfigError(f"data.thresholds={thresholds!r} is invalid: it must be a tuple of "
                          "scores such as (1.5, 3.5)" + _fix("data.thresholds"))
    if not all(1 < t <= 5 for t in thresholds) or any(
            b <= a for a, b in zip(thresholds, thresholds[1:], strict=False)):
        raise ConfigError(f"data.thresholds={tuple(thresholds)!r} is invalid: thresholds must "
                          "increase strictly and lie in (1, 5] (scores are 1-5; stage k holds "
                          "[t_(k-1), t_k)), e.g. (1.5, 3.5)" + _fix("data.thresholds"))
    order = _field(c, "data.order")
    if not isinstance(order, str):
        raise ConfigError(f"data.order={order!r} is invalid: it must be a string such as "
                          "'1,2,3'" + _fix("data.order"))
    check_order(order, quantiles or len(thresholds) + 1)  # names data.order and the fix
    if replay is not _ABSENT and replay > 0 and single_phase(order):
        raise ConfigError(f"data.replay={replay!r} has no effect with data.order={order!r} "
                          "(one phase: nothing earlier to replay); set --config.data.replay=0 "
                          "or use a phased order such as '1,2,3'")


def _check_model(c: ConfigDict) -> None:
    """The model's own checks (shapes, remat policy, architecture) and its precision."""
    _choice(c, "model.dtype", DTYPES)
    _choice(c, "model.param_dtype", DTYPES)
    try:
        model_config(c.model)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model: {e}; fix the model section or its preset") from None
    if c.model.get("attention_impl") == "cudnn" and _field(c, "data.packing") is True:
        raise ConfigError("model.attention_impl='cudnn' cannot express packed segments "
                          "(data.packing=True): use 'auto' (xla on GPU when packing), 'xla', or "
                          "data.packing=False" + _fix("model.attention_impl"))
    _check_lora(c)


ON_UNREADABLE = ("stop", "restart")
EXPORT_LORA = ("merged", "adapter", "both")


def _check_lora(c: ConfigDict) -> None:
    """`model.lora`, where the config has it (configs built before LoRA have none): valid
    values, no LoRA field set while LoRA is off, and a pretrained base to adapt."""
    if _field(c, "model.lora") is _ABSENT:
        return
    rank = _number(c, "model.lora.rank", lambda v: v >= 0,
                   ">= 0 (the adapters' rank; 0 = LoRA off, full fine-tuning)", integer=True)
    if rank is not _ABSENT and rank > 0:
        _number(c, "model.lora.alpha", lambda v: v > 0, "> 0 (the update is alpha / rank * B A)")
    _number(c, "model.lora.dropout", lambda v: 0 <= v < 1, "in [0, 1)")
    _choice(c, "model.lora.base_qtype", QTYPES)
    targets = _field(c, "model.lora.targets")
    if targets is not _ABSENT:
        try:
            parse_targets(targets)
        except (TypeError, ValueError) as e:  # names the value and what it could have matched
            raise ConfigError(f"{e}{_fix('model.lora.targets')}") from None
    if rank is _ABSENT or rank == 0:
        for name, default in lora_section().items():
            value = _field(c, f"model.lora.{name}")
            if name == "rank" or value is _ABSENT or (
                    parse_targets(value) == parse_targets(default) if name == "targets"
                    else value == default):  # targets: the modules named, however spelt
                continue
            raise ConfigError(
                f"model.lora.{name}={value!r} has no effect: LoRA is off "
                "(model.lora.rank=0, full fine-tuning); set --config.model.lora.rank=16 to "
                f"train adapters, or reset model.lora.{name} to {default!r}")
        return
    qtype = _field(c, "model.lora.base_qtype")
    if qtype not in (_ABSENT, ""):
        for name in ("hidden_size", "intermediate_size"):
            size = _field(c, f"model.{name}")
            why = None if size is _ABSENT else check_divisible(f"model.{name}", size, qtype)
            if why:
                raise ConfigError(f"{why}; use --config.model.lora.base_qtype='' (the base "
                                  "unquantised) for this model")
        if _field(c, "model.lora.merge_each_phase") is True:
            raise ConfigError(
                f"model.lora.merge_each_phase=True with model.lora.base_qtype={qtype!r}: merging "
                "into a quantised base would re-quantise it at each phase end and round most of "
                "the phase's update away; set --config.model.lora.merge_each_phase=False (the "
                "adapters carry across phases) or --config.model.lora.base_qtype=''")
    if _field(c, "model.lora.merge_each_phase") is True:
        if _field(c, "train.schedule_scope") == "run":
            raise ConfigError(
                "model.lora.merge_each_phase=True with train.schedule_scope='run': the optimizer "
                "state would carry over to adapters it never saw (each phase starts fresh ones "
                "after the merge); use --config.train.schedule_scope=phase")
        if _field(c, "checkpoint.phase_params") is False:
            raise ConfigError(
                "model.lora.merge_each_phase=True needs checkpoint.phase_params=True: a resumed "
                "run rebuilds its merged base from each finished phase's adapters in phases/; "
                "set --config.checkpoint.phase_params=True")
    init_from = _field(c, "model.init_from")
    if init_from is _ABSENT or not init_from:
        raise ConfigError(f"model.lora.rank={rank} needs model.init_from, which is empty: LoRA "
                          "trains adapters on a frozen pretrained base: set model.init_from to an "
                          "HF directory or checkpoint (--config.model.init_from=DIR), or "
                          "--config.model.lora.rank=0 for full fine-tuning")


def _check_checkpoint(c: ConfigDict) -> None:
    _number(c, "checkpoint.every_steps", lambda v: v >= 0, ">= 0 (0 = only at phase ends)",
            integer=True)
    _number(c, "checkpoint.keep", lambda v: v >= 1, ">= 1", integer=True)
    _number(c, "checkpoint.restore_retries", lambda v: v >= 0, ">= 0", integer=True)
    _number(c, "checkpoint.retry_backoff_s", lambda v: v >= 0, ">= 0 (seconds)")
    _choice(c, "checkpoint.on_unreadable", ON_UNREADABLE)


def _check_export(c: ConfigDict) -> None:
    """The export's dtype, and its LoRA form (which reads `model.lora`, where the config has
    it, whether or not the `model` section is checked too)."""
    _choice(c, "export.dtype", DTYPES)
    form = _choice(c, "export.lora", EXPORT_LORA)
    if form in ("adapter", "both") and _field(c, "model.lora.merge_each_phase") is True:
        raise ConfigError(
            f"export.lora={form!r} is impossible with model.lora.merge_each_phase=True: after a "
            "merge, the later phases' adapters sit on a base that is no longer the original, so "
            "a PEFT adapter of the run cannot be applied to the original base; use "
            "--config.export.lora=merged (or --config.model.lora.merge_each_phase=False)")


_CHECKS: dict[str, Callable[[ConfigDict], None]] = {
    "train": _check_train, "data": _check_data, "model": _check_model,
    "checkpoint": _check_checkpoint, "export": _check_export}
