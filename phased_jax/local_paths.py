"""The paths a command reads and writes, checked before any data is read: one line each.

Each subcommand calls its `check_*` right after its command line and config are parsed, so a
missing input or an output that cannot be a directory costs the second a config error costs,
not the minutes of Hub retries, data reading and tokenising that came before it.

- **Inputs.** A value that names a local path (see `is_hub_id`) and does not exist is a
  UsageError (exit 2): `no such file or directory: PATH (FIELD, relative to CWD); what to do`.
  `data.tokenizer`, `model.init_from` and the model flags (`--hf`, `--checkpoint`, `--run`,
  `--base`, `--adapter`, `--tokenizer`) are local directories only (they are loaded offline), so any value of theirs
  that does not exist is such a path. `model.init_from` is checked where it is read: `train`
  (unless the run resumes from its checkpoints) and `score`; `plan` and `compile` need none.
- **The Hub.** Only `data.paths` / `data.eval_path` (with `data.format` auto or hf) may name
  Hugging Face Hub datasets, and only a value that can be nothing else is one. Before
  `datasets` is asked (it retries an unreachable Hub for half a minute), the endpoint
  (`HF_ENDPOINT`, default https://huggingface.co) gets one HEAD request with a short time-out;
  no answer is one line naming `HF_HUB_OFFLINE`. With `HF_HUB_OFFLINE=1` nothing is probed and
  a dataset missing from the cache is one line too (`hub_load_error`).
- **Outputs.** Every folder a command writes (a run's `output_dir` and what it holds,
  `data.cache_dir`, `checkpoint.dir`, `convert`'s output, ...) must not be a file, nor lie
  under one; an output file must not be a folder.

`quiet_transformers_notice` drops transformers' "PyTorch was not found" notice, which means
nothing to our commands (they use transformers for tokenizers only); every other record passes.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from phased_jax.errors import DataError, UsageError

# A Hub repo id: `name` or `org/name`, each part letters, digits, `.`, `_`, `-`.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
# Suffixes of data, model and archive files: a value ending so is a file, not a Hub id.
FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".tsv", ".txt", ".arrow", ".gz", ".bz2",
                 ".xz", ".zst", ".zip", ".tar", ".py", ".safetensors", ".bin", ".model", ".yaml",
                 ".yml", ".pt", ".ckpt", ".npz", ".npy")
HUB_FORMATS = ("auto", "hf")
DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 4.0
_TRUE = ("1", "on", "yes", "true")


def is_hub_id(value: str) -> bool:
    """Whether `value` can only be a Hugging Face Hub id: exactly `name` or `org/name` (no
    `./`, `../`, `~` or `/` prefix, no second `/`), with no file suffix, and whose first part
    is not a local file or directory. Anything else names a local path."""
    if not _HUB_ID.fullmatch(value) or value.lower().endswith(FILE_SUFFIXES):
        return False
    return not Path(value.split("/", 1)[0]).exists()


def _where(path: str) -> str:
    if Path(path).is_absolute():
        return ""
    if path.startswith("~"):
        return f", relative to {Path.cwd()}: ~ is not expanded here, write the full path"
    return f", relative to {Path.cwd()}"


def _missing(path: str, field: str, fix: str, what: str = "file or directory") -> UsageError:
    return UsageError(f"no such {what}: {path} ({field}{_where(path)}); {fix}")


def _config_fix(field: str, example: str) -> str:
    return f"fix it in the config file or override it with --config.{field}={example}"


# --- inputs ---------------------------------------------------------------------------------

def check_data_source(value: str, field: str, fmt: str = "auto") -> str | None:
    """A `data.paths`-like value: None if it exists, the value if it is a Hub dataset id to
    try (format auto or hf), else a UsageError (a local path that does not exist)."""
    if "://" in value or Path(value).exists():
        return None
    if fmt in HUB_FORMATS and is_hub_id(value):
        return value
    example = "'(\"FILE\",)'" if field == "data.paths" else "FILE"
    why = ("" if fmt in HUB_FORMATS else
           f"data.format={fmt!r} reads local files only; ")
    raise _missing(value, field, why + _config_fix(field, example))


_HUB_HINT = " (a Hub model is downloaded first: hf download ORG/NAME --local-dir DIR)"


def check_local_dir(value: str, field: str, what: str, fix: str, *,
                    holds: Sequence[str] = (), hub_hint: bool = True) -> None:
    """`value` must be an existing local directory, `what` (`a tokenizer or model`), holding
    one of `holds` if given; `fix` says what to do."""
    p = Path(value)
    must = f"{field} must be a local directory: {what}" + (_HUB_HINT if hub_hint else "")
    if not p.exists():
        raise _missing(value, field, f"{must}; {fix}", "directory")
    if not p.is_dir():
        raise UsageError(f"{field} {value}: is a file; {must}; {fix}")
    if holds and not any((p / name).is_file() for name in holds):
        raise UsageError(f"{field} {value}: holds no {' or '.join(holds)}; {must}; {fix}")


ADAPTER = "a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)"
ADAPTER_FIX = "give its directory (a LoRA run writes RUN/adapter and RUN/phases/PHASE)"


def check_adapter(args: Any) -> None:
    """`--adapter`, where given: a local directory holding adapter_config.json (the weights
    file is the adapter reader's to name, with the rest of what it checks)."""
    if getattr(args, "adapter", None) is not None:
        check_local_dir(str(args.adapter), "--adapter", ADAPTER, ADAPTER_FIX,
                        holds=("adapter_config.json",))


def check_config_inputs(config: Any, *, eval_path: bool = False, tokenizer: bool = True
                        ) -> list[tuple[str, str]]:
    """The data section's inputs (`data.paths`, `data.eval_path` if `eval_path`,
    `data.tokenizer` if `tokenizer` and set): raise for a missing local path; return the
    (field, Hub id) pairs left to try on the Hub."""
    d = config.data
    fmt = d.get("format", "auto")
    hub: list[tuple[str, str]] = []
    for value in d.paths:
        if (name := check_data_source(str(value), "data.paths", fmt)) is not None:
            hub.append(("data.paths", name))
    if eval_path and d.get("eval_path"):
        if (name := check_data_source(str(d.eval_path), "data.eval_path", fmt)) is not None:
            hub.append(("data.eval_path", name))
    if tokenizer and d.get("tokenizer"):
        check_local_dir(str(d.tokenizer), "data.tokenizer", "a Hugging Face tokenizer or "
                        "model", _config_fix("data.tokenizer", "DIR"))
    return hub


def check_init_from(config: Any) -> None:
    """`model.init_from`, where set: a local HF model directory or params checkpoint."""
    path = str(config.model.get("init_from", "") or "")
    if path:
        check_local_dir(path, "model.init_from", "a Hugging Face model (config.json) or a "
                        "phased-jax params checkpoint (model_config.json)",
                        _config_fix("model.init_from", "DIR"),
                        holds=("config.json", "model_config.json"))


def _has_checkpoints(config: Any) -> bool:
    """Whether the run's checkpoint folder holds a step already (a resume reads no init_from)."""
    ckpt = config.checkpoint.get("dir", "") or os.path.join(str(config.output_dir), "checkpoints")
    if "://" in ckpt:
        return False  # gs://...: not listed here; init_from is checked as for a fresh start
    try:
        return any(p.name.isdigit() for p in Path(ckpt).iterdir())
    except OSError:
        return False


# --- outputs --------------------------------------------------------------------------------

def folder_problem(path: str | Path) -> str | None:
    """Why `path` cannot be a folder a command creates and fills, or None: it is a file, or a
    file stands where one of its parent folders would be."""
    p = Path(path)
    if p.exists():
        return None if p.is_dir() else f"{p} is a file, not a directory"
    for parent in p.parents:
        if parent.exists():
            if parent.is_dir():
                return None
            return f"{parent} is a file, so the directory {p} cannot be made"
    return None


def check_output_dir(path: str | Path, field: str, fix: str) -> None:
    if "://" in str(path):  # gs://...: Orbax's, checked where it is written
        return
    if (problem := folder_problem(path)) is not None:
        raise UsageError(f"{field}: {problem}; {fix}")


def check_output_file(path: str | Path, field: str) -> None:
    """An output file (its folder is made if missing): not a folder, nor under a file."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{field} {p}: is a directory; give a file path, e.g. {p / 'out.jsonl'}")
    if (problem := folder_problem(p.parent)) is not None:
        raise UsageError(f"{field} {p}: {problem}; give another path")


def check_run_outputs(config: Any) -> None:
    """Every folder `train` writes: `output_dir` and what it holds (`logs/`, `phases/`), the
    token cache, the run checkpoints and the HF export."""
    out = str(config.output_dir)
    check_output_dir(out, "output_dir", _config_fix("output_dir", "DIR") + " (a directory)")
    d, ck, ex = config.data, config.get("checkpoint", {}), config.get("export", {})
    for value, field, default in (
            (d.get("cache_dir", ""), "data.cache_dir", "token_cache"),
            (ck.get("dir", ""), "checkpoint.dir", "checkpoints"),
            (ex.get("hf_dir", ""), "export.hf_dir", "hf"),
            ("", "output_dir", "logs"), ("", "output_dir", "phases")):
        path = value or os.path.join(out, default)
        name = field if value or field == "output_dir" else f"{field} (default: output_dir/{default})"
        check_output_dir(path, name, _config_fix(field, "DIR") + " (a directory)")


# --- the Hub --------------------------------------------------------------------------------

def hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_problem(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the Hub endpoint cannot be reached (one HEAD request, through the environment's
    proxies, DNS included in `timeout`), or None when it answers anything at all."""
    result: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(hub_endpoint(), method="HEAD"),
                                   timeout=timeout).close()
            result.append(None)
        except urllib.error.HTTPError:  # an answer, even 4xx/5xx: the Hub is there
            result.append(None)
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            result.append(str(getattr(reason, "strerror", None) or reason))

    thread = threading.Thread(target=probe, daemon=True, name="hub-probe")
    thread.start()
    thread.join(timeout + 1.0)
    return result[0] if result else f"no answer in {timeout:g} s"


def check_hub(ids: Iterable[tuple[str, str]]) -> None:
    """Before `datasets` is asked for these (field, Hub id) pairs: the Hub must answer, unless
    the user chose offline mode (then the cache serves them, or `hub_load_error` says why not)."""
    ids = list(ids)
    if not ids or hub_offline():
        return
    problem = hub_problem()
    if problem is None:
        return
    field, name = ids[0]
    raise DataError(
        f"{field}: {name!r} is not a local file or directory, so it is read as a Hugging Face "
        f"Hub dataset, but the Hub at {hub_endpoint()} cannot be reached ({problem}); check "
        "the network (or HF_ENDPOINT), set HF_HUB_OFFLINE=1 to use only datasets already in "
        f"the local cache, or give a local path (./{name})")


def hub_load_error(name: str, error: BaseException) -> str | None:
    """A clearer line for `datasets`' failure to load Hub dataset `name` in offline mode (not
    in the cache), else None (the caller's own message stands)."""
    text = f"{type(error).__name__}: {error}"
    if hub_offline() and ("Offline" in text or "offline" in text):
        return (f"{name}: not a local file or directory, and not in the local Hugging Face "
                "cache as a Hub dataset; HF_HUB_OFFLINE=1 (or HF_DATASETS_OFFLINE=1) forbids "
                "downloading it: unset them to download it, or give a local path")
    return None


# --- each command ---------------------------------------------------------------------------

def check_train(config: Any) -> None:
    """`phased-jax train`: the data, tokenizer, base model (unless the run resumes from its
    checkpoints), outputs, then the Hub (if a dataset is there)."""
    hub = check_config_inputs(config, eval_path=True)
    if not _has_checkpoints(config):
        check_init_from(config)
    check_run_outputs(config)
    check_hub(hub)


def check_stats(config: Any) -> None:
    """`phased-jax stats`: reads the data and the tokenizer, writes nothing."""
    check_hub(check_config_inputs(config))


def check_score(config: Any, output: str) -> None:
    """`phased-jax score`: the data, the tokenizer, the model, `--output` and its chunk folder."""
    hub = check_config_inputs(config)
    check_init_from(config)
    check_output_file(output, "--output")
    check_output_dir(f"{output}.chunks", "--output", "give another --output (its "
                     "FILE.chunks/ folder keeps finished chunks)")
    check_hub(hub)


def check_generate(args: Any) -> None:
    """`phased-jax generate`: the model, tokenizer and question flags, `--output` (a file, or
    a folder with `--run`), the cache."""
    fix = "give the model's directory"
    if getattr(args, "hf", None):
        check_local_dir(args.hf, "--hf", "a Hugging Face model (config.json + safetensors)",
                        fix + " (a run writes RUN/hf)", holds=("config.json",))
    if getattr(args, "checkpoint", None):
        check_local_dir(args.checkpoint, "--checkpoint", "a phased-jax params checkpoint "
                        "(model_config.json + params/)", fix + " (a run writes "
                        "RUN/phases/PHASE; `phased-jax convert` makes one from an HF model)",
                        holds=("model_config.json",), hub_hint=False)
    run = getattr(args, "run", None)
    if run:
        check_local_dir(run, "--run", "a training run's output_dir (phases/phase<k>-<name>/, "
                        "hf/)", "give the output_dir of a `phased-jax train` run",
                        hub_hint=False)
    if getattr(args, "base", None):
        check_local_dir(args.base, "--base", "the base model of a LoRA run's adapters, a "
                        "Hugging Face model (config.json) or a params checkpoint "
                        "(model_config.json)", "give the run's model.init_from",
                        holds=("config.json", "model_config.json"))
    check_adapter(args)
    if getattr(args, "tokenizer", None):
        check_local_dir(args.tokenizer, "--tokenizer", "a Hugging Face tokenizer or model",
                        "give its directory")
    if getattr(args, "input", None) and not Path(args.input).exists():
        raise _missing(args.input, "--input", "give a file of questions", "file")
    test_sets = getattr(args, "test_sets", None)
    if test_sets and test_sets != "paper":
        check_local_dir(test_sets, "--test-sets", "of <set>.jsonl files",
                        "give that directory, or 'paper' for the paper's six sets",
                        hub_hint=False)
    if getattr(args, "output", None) and run:
        check_output_dir(args.output, "--output", "with --run, --output is a folder (it gets "
                         "one answers file per model): give a folder's path")
    elif getattr(args, "output", None):
        check_output_file(args.output, "--output")
    if test_sets == "paper" and getattr(args, "cache_dir", None):
        check_output_dir(args.cache_dir, "--cache-dir", "give a directory for the built sets")
        source = getattr(args, "alpaca_eval_source", "")
        if not Path(args.cache_dir, "manifest.json").exists() and is_hub_id(source):
            check_hub([("--alpaca-eval-source (for --test-sets paper)", source)])


def check_convert(args: Any) -> None:
    """`phased-jax convert SRC DST`: SRC exists and is a directory, DST can be one."""
    src = getattr(args, "src", None)
    if src is not None:
        check_local_dir(str(src), "convert's input SRC", "a Hugging Face model (config.json) "
                        "or a params checkpoint (model_config.json)", "give its directory")
    check_adapter(args)
    if getattr(args, "tokenizer", None) is not None:
        check_local_dir(str(args.tokenizer), "--tokenizer", "a Hugging Face tokenizer or "
                        "model", "give its directory")
    dst = getattr(args, "dst", None)
    if dst is not None:
        check_output_dir(dst, "convert's output", "give a directory that does not exist yet, "
                         "or an empty one (--overwrite replaces a full one)")


# --- transformers' notice -------------------------------------------------------------------

_NOTICE = "PyTorch was not found."


class _DropTorchNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NOTICE)


def quiet_transformers_notice() -> None:
    """Drop transformers' `PyTorch was not found. Models won't be available...` (logged once,
    when transformers is imported without torch): our commands use it for tokenizers only.
    Only that record is dropped; call before transformers is imported."""
    logger = logging.getLogger("transformers")
    if not any(isinstance(f, _DropTorchNotice) for f in logger.filters):
        logger.addFilter(_DropTorchNotice())
