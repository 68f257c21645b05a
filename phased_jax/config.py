"""The experiment config: one ConfigDict tree, every number of a run in one place.

Experiment files in `configs/` start from `get_default_config()` and change what their
experiment changes; any field can be overridden on the command line
(`--config.train.lr=1e-5`). Each section's defaults are the paper's settings where the paper
fixes them (DESIGN.md section 1).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from phased_jax.errors import ConfigError, UsageError
from phased_jax.model.config import ModelConfig, get_preset


def model_section(preset: str, **overrides) -> ConfigDict:
    """All fields of a model preset as a ConfigDict, so each is overridable from the command line."""
    section = ConfigDict(get_preset(preset, **overrides).to_dict())
    section.preset = preset
    section.init_from = ""  # HF directory or Orbax checkpoint to start from; "" = random init
    return section


def model_config(section: ConfigDict) -> ModelConfig:
    """The ModelConfig a `model` section describes."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig.from_dict({k: v for k, v in section.to_dict().items() if k in fields})


def get_default_config() -> ConfigDict:
    c = ConfigDict()
    c.name = "default"
    c.output_dir = "runs/default"
    c.seed = 3517

    c.model = model_section("tiny-llama")

    c.data = ConfigDict()
    c.data.paths = ()  # files, directories or HF dataset names (see phased_jax.data.records)
    c.data.format = "auto"  # auto | alpaca | authors | scored | jsonl | hf
    c.data.hf_split = "train"  # split of a Hugging Face dataset in data.paths
    c.data.fields = ConfigDict(dict(instruction="instruction", input="input", output="output",
                                    score="score", id="id"))
    c.data.on_invalid = "error"  # error | skip (skipped records are listed in a report)
    # A JSONL line (or JSON-list element) longer than this is a bad record, refused before it is
    # parsed or tokenised: one 50 MB line once took 10 GB and 90 s to tokenise. Real
    # instructions are a few KB; raise it only for data that needs it.
    c.data.max_record_bytes = 1_000_000
    c.data.thresholds = (1.5, 3.5)  # phase k holds scores in [t_{k-1}, t_k); the paper's three phases
    c.data.quantiles = 0  # >0: K phases of equal size by score quantile instead of thresholds
    c.data.order = "1,2,3"  # "1,2,3" phased | "oneoff" | "2,1,3" | "random" | "3" | "1+3" ...
    c.data.template = "authors"  # authors | alpaca | chat
    c.data.tokenizer = ""  # local HF tokenizer directory
    c.data.max_length = 2048
    c.data.packing = False  # several examples per row, attention kept within each (segment ids)
    c.data.eval_path = ""  # held-out records for eval loss; "" = none
    c.data.eval_fraction = 0.0  # or hold out this fraction of each phase
    c.data.cache_dir = ""  # tokenisation cache; "" = <output_dir>/token_cache
    c.data.shuffle = True  # seeded per (seed, phase, epoch); False keeps read order
    c.data.log_reads = False  # log each process's example ids per step (multi-host read tests)

    c.train = ConfigDict()
    c.train.global_batch = 128
    c.train.grad_accum = 1
    c.train.epochs_per_phase = 2
    c.train.max_steps_per_phase = -1  # >0 caps each phase (smoke runs); -1 = epochs decide
    c.train.lr = 5e-6
    c.train.warmup_ratio = 0.1
    c.train.schedule = "cosine"  # cosine | linear | constant
    c.train.min_lr_ratio = 0.0
    c.train.weight_decay = 0.1
    c.train.b1 = 0.9
    c.train.b2 = 0.95
    c.train.eps = 1e-8
    c.train.clip_norm = 1.0
    c.train.z_loss = 0.0  # >0: adds z_loss * logsumexp(logits)^2 per response token (PaLM uses 1e-4)
    c.train.compute_dtype = "bfloat16"  # activations and matmuls in training (overrides model.dtype)
    c.train.param_dtype = "float32"  # stored parameters and gradients (overrides model.param_dtype)
    c.train.opt_state_dtype = ""  # Adam moments; "" = same as param_dtype
    c.train.carry_optimizer = False  # paper: each phase starts with fresh optimizer state and LR schedule
    c.train.log_every = 10
    c.train.eval_every = 0  # 0: eval at each phase end only
    c.train.peak_flops = 0.0  # per device, for MFU where the device kind is unknown (CPU); 0 = probe
    c.train.tensorboard = True  # event files in <output_dir>/tensorboard (also metrics.jsonl)

    c.mesh = ConfigDict()
    c.mesh.shape = (1, -1, 1)  # (data, fsdp, tensor) within a slice; -1 = the rest of the devices
    c.mesh.dcn_shape = (1, 1, 1)  # across slices (multi-slice pods)
    c.mesh.rules = (
        ("batch", ("data", "fsdp")),
        ("length", None),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("mlp", "tensor"),
        ("layers", None),
        ("act_embed", None),
        ("act_heads", "tensor"),
        ("act_kv_heads", "tensor"),
        ("act_mlp", "tensor"),
        ("act_vocab", "tensor"),
    )

    c.checkpoint = ConfigDict()
    c.checkpoint.dir = ""  # "" = <output_dir>/checkpoints; gs:// paths work
    c.checkpoint.every_steps = 500
    c.checkpoint.keep = 3  # rolling checkpoints; phase-end checkpoints are always kept
    c.checkpoint.async_save = True
    c.checkpoint.phase_params = True  # also save each phase's params under <output_dir>/phases/
    c.checkpoint.restore_retries = 3  # a checkpoint that cannot be read is retried this often
    c.checkpoint.retry_backoff_s = 1.0  # first wait between tries; doubles each time

    c.export = ConfigDict()
    c.export.hf_dir = ""  # "" = <output_dir>/hf
    c.export.at_end = True
    c.export.dtype = "bfloat16"
    return c


def _one_line(text: str) -> str:
    """A message on one line: usage errors are printed as `prog: error: ...` and nothing more."""
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


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


def validate_config(config: ConfigDict) -> None:
    """Raise a ConfigError naming the first invalid field, its value and what to do.

    Called where a config is parsed (`parse_config_argv`), so a mistake costs a second, not the
    hour of compiling and data loading that comes before a pod's first step. It checks what the
    config alone decides; what needs the data (an empty phase) or the devices (the batch over
    the mesh) is checked as soon as those are known: `data.pipeline.prepare` and
    `sharding.check_batch` (Trainer construction), both before the first step.
    """
    from phased_jax.data.phases import parse_order
    from phased_jax.data.records import FORMATS
    from phased_jax.data.templates import TEMPLATES

    c = config
    # train
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
    _choice(c, "train.schedule", ("cosine", "linear", "constant"))
    _number(c, "train.min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]")
    _number(c, "train.weight_decay", lambda v: v >= 0, ">= 0")
    _number(c, "train.b1", lambda v: 0 <= v < 1, "in [0, 1)")
    _number(c, "train.b2", lambda v: 0 <= v < 1, "in [0, 1)")
    _number(c, "train.eps", lambda v: v > 0, "> 0")
    _number(c, "train.clip_norm", lambda v: v >= 0, ">= 0 (0 = no clipping)")
    _number(c, "train.z_loss", lambda v: v >= 0, ">= 0")
    _number(c, "train.log_every", lambda v: v >= 1, ">= 1", integer=True)
    _number(c, "train.eval_every", lambda v: v >= 0, ">= 0 (0 = at each phase end)", integer=True)
    _choice(c, "train.compute_dtype", DTYPES)
    _choice(c, "train.param_dtype", DTYPES)
    _choice(c, "train.opt_state_dtype", ("", *DTYPES))
    # data
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
    parse_order(order, quantiles or len(thresholds) + 1)  # names data.order and the fix
    # model and export: the model's own checks (shapes, remat policy, architecture)
    try:
        model_config(c.model)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model: {e}; fix the model section or its preset") from None
    _choice(c, "export.dtype", DTYPES)
    _number(c, "checkpoint.every_steps", lambda v: v >= 0, ">= 0 (0 = only at phase ends)",
            integer=True)
    _number(c, "checkpoint.keep", lambda v: v >= 1, ">= 1", integer=True)
    _number(c, "checkpoint.restore_retries", lambda v: v >= 0, ">= 0", integer=True)
    _number(c, "checkpoint.retry_backoff_s", lambda v: v >= 0, ">= 0 (seconds)")


def _field_paths(config: ConfigDict, prefix: str = "") -> list[str]:
    """Every field's dotted path, sections included, for 'did you mean' suggestions."""
    out = []
    for key, value in config.items():
        out.append(prefix + key)
        if isinstance(value, ConfigDict):
            out += _field_paths(value, f"{prefix}{key}.")
    return out


def _check_override(config: ConfigDict, arg: str) -> None:
    """Raise a UsageError if `--config.a.b=v` names no field of `config` (with a suggestion)."""
    key = arg.lstrip("-").split("=", 1)[0].removeprefix("config.")
    node: Any = config
    for i, part in enumerate(key.split(".")):
        name = part.split("[", 1)[0]
        if not isinstance(node, ConfigDict):
            done = ".".join(key.split(".")[:i])
            raise UsageError(f"{arg}: {done} is a value ({type(node).__name__}), not a section "
                             f"with field {name!r}")
        if name not in node:
            close = difflib.get_close_matches(key, _field_paths(config), n=1, cutoff=0.6)
            hint = (f"; did you mean {close[0]!r}?" if close
                    else f"; the config's sections are {', '.join(sorted(config.keys()))}")
            raise UsageError(f"{arg}: the config has no field {key!r}{hint}")
        node = node[name]


def load_config_file(spec: str) -> ConfigDict:
    """The ConfigDict of `--config FILE[:ARG]`, or a one-line UsageError naming the file.

    `config_flags` reports these mistakes as raw tracebacks (or an OSError on first access);
    loading the file here first turns each into a message that says what is wrong and where.
    """
    path, arg = spec, None
    if not Path(spec).exists() and ":" in spec and Path(spec.rsplit(":", 1)[0]).exists():
        path, arg = spec.rsplit(":", 1)  # config_flags' FILE:ARG, passed to get_config(ARG)
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--config {path}: no such file (give an experiment file such as "
                         "configs/llama2_7b_phased.py)")
    if p.is_dir():
        raise UsageError(f"--config {path}: is a directory; give one config file in it, e.g. "
                         f"{path.rstrip('/')}/NAME.py")
    module_spec = importlib.util.spec_from_file_location(f"config_{p.stem}", p)
    if module_spec is None or module_spec.loader is None:
        raise UsageError(f"--config {path}: not a Python file (a config file is a .py file "
                         "with get_config())")
    module = importlib.util.module_from_spec(module_spec)

    def failure(e: Exception, what: str) -> UsageError:
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
                 if Path(f.filename).resolve() == p.resolve()]
        where = f"{path}:{lines[-1]}" if lines else path
        return UsageError(f"--config {where}: {what} failed: {type(e).__name__}: "
                          f"{_one_line(e)}")

    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # any error in the user's file: name the file, not our stack
        raise failure(e, "importing it") from None
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise UsageError(f"--config {path}: defines no get_config(); a config file defines "
                         "get_config() returning a ConfigDict (see configs/llama2_7b_phased.py)")
    try:
        config = get_config() if arg is None else get_config(arg)
    except Exception as e:
        raise failure(e, "get_config()") from None
    if not isinstance(config, ConfigDict):
        raise UsageError(f"--config {path}: get_config() returned {type(config).__name__}, "
                         "not an ml_collections ConfigDict")
    return config


def _config_spec(argv: Sequence[str]) -> str | None:
    """The value of `--config FILE` / `--config=FILE` in `argv`, if any."""
    for i, a in enumerate(argv):
        if a in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(("--config=", "-config=")):
            return a.split("=", 1)[1]
    return None


def parse_config_argv(argv: Sequence[str], prog: str, usage: str,
                      define_extra: Callable[[Any], None] | None = None) -> Any:
    """Parse `--config FILE [--config.a.b=v ...]` (and extra flags) for a subcommand.

    Returns the FlagValues (`.config` is the validated ConfigDict), or None after printing help.
    Every mistake in the command line or the config file (missing file, import error, unknown
    field, bad value) is a one-line UsageError, found before any data is read. A fresh
    FlagValues per call, so `main()` can run many times in one process (tests).
    """
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    argv = [prog, *argv]  # sys_argv: which --config.X overrides to define (not sys.argv in tests)
    config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)",
                                    flag_values=fv, lock_config=True, sys_argv=argv)
    if define_extra is not None:
        define_extra(fv)
    if any(a in ("-h", "--help", "--helpfull") for a in argv):
        print(usage + "\n" + fv.get_help())
        return None
    see_help = f" (see {prog} --help)"
    spec = _config_spec(argv[1:])
    if spec is None:
        raise UsageError("--config is required: give an experiment file, e.g. "
                         f"--config configs/llama2_7b_phased.py{see_help}")
    loaded = load_config_file(spec)
    for a in argv[1:]:
        if a.startswith(("--config.", "-config.")):
            _check_override(loaded, a)
    try:
        fv(argv)
        config = fv.config
    except flags.Error as e:
        raise UsageError(_one_line(e) + see_help) from None
    except Exception as e:  # config_flags' own errors on overrides (types, locked fields)
        raise UsageError(f"{type(e).__name__}: {_one_line(e)}{see_help}") from None
    if config is None:
        raise UsageError(f"--config is required{see_help}")
    try:
        validate_config(config)
    except ConfigError as e:
        raise UsageError(_one_line(e)) from None
    return fv
