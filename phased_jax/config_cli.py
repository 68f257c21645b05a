"""`--config FILE [--config.SECTION.FIELD=VALUE ...]` on a subcommand's command line.

`config_flags` reports a config file's mistakes as raw tracebacks; here each is one line
(a UsageError, exit 2) naming the file, the field, and what to do.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from absl import flags
from ml_collections import ConfigDict, config_flags

from phased_jax.config_checks import SECTIONS, validate_config
from phased_jax.errors import ConfigError, UsageError
from phased_jax.init_from import resolve_model, unset_preset_fields


def _one_line(text: str) -> str:
    """A message on one line: usage errors are printed as `prog: error: ...` and nothing more."""
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _field_paths(config: ConfigDict, prefix: str = "") -> list[str]:
    """Every field's dotted path, sections included, for 'did you mean' suggestions."""
    out = []
    for key, value in config.items():
        out.append(prefix + key)
        if isinstance(value, ConfigDict):
            out += _field_paths(value, f"{prefix}{key}.")
    return out


# Fields that were replaced, and what to write instead
RENAMED = {"train.carry_optimizer": "use train.schedule_scope='run' for True, 'phase' for False"}


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
            hint = (f"; it was replaced: {RENAMED[key]}" if key in RENAMED
                    else f"; did you mean {close[0]!r}?" if close
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


def flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value of `--name VALUE` / `--name=VALUE` in `argv`, if any (read before parsing)."""
    for i, a in enumerate(argv):
        if a in (f"--{name}", f"-{name}") and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith((f"--{name}=", f"-{name}=")):
            return a.split("=", 1)[1]
    return None


def split_config_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(`--config FILE` and `--config.X=V` words, the other words): for a subcommand whose own
    options are argparse's while the experiment config comes as in `train`."""
    config, rest = [], []
    words = iter(argv)
    for a in words:
        if a in ("--config", "-config"):
            config += [a, next(words, "")]
        elif a.startswith(("--config=", "-config=", "--config.", "-config.")):
            config.append(a)
        else:
            rest.append(a)
    return config, rest


def add_config_help(parser: argparse.ArgumentParser, example: str) -> None:
    """List `--config` and its overrides in an argparse subcommand's --help. They are never
    parsed there: `split_config_argv` takes those words out first."""
    group = parser.add_argument_group("experiment config (read as in `phased-jax train`)")
    group.add_argument("--config", metavar="FILE", help="experiment config file (configs/*.py); "
                       "default: phased_jax.config's defaults")
    group.add_argument("--config.SECTION.FIELD", metavar="VALUE", dest="config_override",
                       help=f"override one field, e.g. {example}")


def parse_config_argv(argv: Sequence[str], prog: str, usage: str,
                      define_extra: Callable[[Any], None] | None = None, *,
                      default: Callable[[], ConfigDict] | None = None,
                      sections: Sequence[str] = SECTIONS,
                      model_source: tuple[str, str] = ("", "")) -> Any:
    """Parse `--config FILE [--config.a.b=v ...]` (and extra flags) for a subcommand.

    Returns the FlagValues (`.config` is the validated ConfigDict), or None after printing help.
    Without `--config`, `default()` is the config if given (overrides still apply), else it is
    an error. Only `sections` are validated (a subcommand that reads no data skips `data`).
    The model section is resolved against its checkpoint (`init_from.resolve_model`; from
    `model_source`, (path, flag), instead of `model.init_from` where the command names the
    model itself).
    Every mistake in the command line or the config file (missing file, import error, unknown
    field, bad value) is a one-line UsageError, found before any data is read. A fresh
    FlagValues per call, so `main()` can run many times in one process (tests).
    """
    fv = flags.FlagValues()
    argv = [prog, *argv]  # sys_argv: which --config.X overrides to define (not sys.argv in tests)
    see_help = f" (see {prog} --help)"
    spec = flag_value(argv[1:], "config")
    wants_help = any(a in ("-h", "--help", "--helpfull") for a in argv)
    if spec is None and default is not None:
        loaded = default()
        config_flags.DEFINE_config_dict("config", loaded, "the experiment config (default: "
                                        "phased_jax.config defaults)", flag_values=fv,
                                        lock_config=True, sys_argv=argv)
    else:
        config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)",
                                        flag_values=fv, lock_config=True, sys_argv=argv)
    if define_extra is not None:
        define_extra(fv)
    if wants_help:
        print(usage + "\n" + fv.get_help())
        return None
    if spec is None and default is None:
        raise UsageError("--config is required: give an experiment file, e.g. "
                         f"--config configs/llama2_7b_phased.py{see_help}")
    if spec is not None:
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
        if "model" in config:
            unset_preset_fields(config.model, loaded.get("model", {}).get("preset", ""))
            resolve_model(config, *model_source)
        validate_config(config, sections)
    except ConfigError as e:
        raise UsageError(_one_line(e)) from None
    return fv
