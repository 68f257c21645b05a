"""A params-only Orbax checkpoint that training starts from: `DIR/params/` + `DIR/model_config.json`.

Everything is written into a temp dir beside DIR and renamed in when complete (`model_config.json`
last, so its presence marks a complete checkpoint); an old DIR is removed only after that.
Restoring goes through an abstract target built from the config, so params land directly in the
caller's shardings (any mesh), never gathered on one host.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from phased_jax import atomic_dir, distributed, io_errors
from phased_jax.errors import CheckpointError
from phased_jax.model.config import ModelConfig
from phased_jax.model.params import abstract_params

PARAMS_ITEM = "params"
CONFIG_FILE = "model_config.json"


def params_nbytes(params: Any) -> int:
    """Bytes of every leaf of `params` (what a save needs on disk, before compression)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(params))


def save_params(directory: str | Path, cfg: ModelConfig, params: dict, *,
                overwrite: bool = False, extra_files: Mapping[str, Path] | None = None) -> Path:
    """Save `params` (a plain pytree of arrays, possibly sharded) and `cfg` under `directory`.

    Call on every process in a multi-host job; Orbax coordinates the array writes, process 0
    moves the files. All of it is written into a temp dir beside `directory` (with the
    `extra_files`, relative name -> source file) and renamed in when complete, so `directory`
    holds the old output or the new one, never a mix, and a full disk loses neither: safe to
    call again over a partial or stale `directory` with `overwrite=True`.
    """
    directory = Path(directory).absolute()
    first = jax.process_index() == 0
    token = distributed.shared_token()
    tmp = atomic_dir.temp_path(directory, token)
    needed = params_nbytes(params)
    error: BaseException | None = None
    if first:  # one process prepares; every process learns whether it could
        try:
            atomic_dir.clean_leftovers(directory)
            atomic_dir.check_target(directory, overwrite)
            atomic_dir.make_temp_dir(directory, token)
        except Exception as e:
            error = e
    replacing = directory.exists()
    if not distributed.all_ok(error is None):
        io_errors.raise_agreed(error, directory, "another process could not prepare it", needed, replacing)
    try:
        with io_errors.quiet_disk_full_noise():
            checkpointer = ocp.StandardCheckpointer()
            try:
                checkpointer.save(tmp / PARAMS_ITEM, params)
                checkpointer.wait_until_finished()
            finally:
                checkpointer.close()
        if first:  # written last: its presence marks complete params
            for name, source in (extra_files or {}).items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, tmp / name)
            (tmp / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    except Exception as e:
        error = e
    ok = distributed.all_ok(error is None)
    if ok and first:
        try:
            atomic_dir.publish(tmp, directory)
        except Exception as e:
            error = e
        ok = error is None
    if not distributed.all_ok(ok):
        if first:
            atomic_dir.discard(tmp)
        io_errors.raise_agreed(error, directory, "another process could not write it", needed, replacing)
    return directory


def params_complete(directory: str | Path) -> bool:
    """Whether `directory` holds a complete params checkpoint (cheap: a few stats and one small
    JSON read), e.g. to decide at resume whether a phase's `phases/` params must be written.

    `model_config.json` is written last inside the temp dir and the whole dir renamed in, so it
    and Orbax's finalised `params/` (metadata plus array data) prove completeness.
    """
    directory = Path(directory)
    try:
        ModelConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    except Exception:  # unreadable, torn or not a config: not complete, whatever the cause
        return False
    params = directory / PARAMS_ITEM
    return ((params / "_METADATA").is_file()
            and any((params / n).exists() for n in ("manifest.ocdbt", "d")))


def read_model_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {directory} is not a complete params checkpoint "
                              "(written by `phased-jax convert` or save_params)")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid model config: {e}") from e


def load_params(directory: str | Path, mesh_shardings: Any = None) -> tuple[ModelConfig, dict]:
    """`(cfg, params)` from `directory`; `mesh_shardings` is a pytree of shardings shaped like
    params (e.g. from the logical-axis rules), default: all on the first local device."""
    directory = Path(directory).absolute()
    cfg = read_model_config(directory)
    abstract = abstract_params(cfg)
    if mesh_shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        mesh_shardings = jax.tree.map(lambda _: device, abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, mesh_shardings)
    checkpointer = ocp.StandardCheckpointer()
    try:
        params = checkpointer.restore(directory / PARAMS_ITEM, target)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise CheckpointError(f"{directory / PARAMS_ITEM}: cannot restore params for the model in "
                              f"{CONFIG_FILE}: {e}") from e
    finally:
        checkpointer.close()
    return cfg, params
