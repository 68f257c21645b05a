"""(model, params) -> an HF directory transformers loads, written one layer's tensors at a time.

Params may be jax Arrays sharded over many devices and processes: each leaf's layer slice is
gathered on its own (to every process, as `process_allgather` of that slice), converted and
written by process 0, so no host holds more than a layer beyond what the params themselves
occupy. In a multi-process run every process calls `save` and takes part in each gather.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from phased_jax.atomic_dir import atomic_directory
from phased_jax.distributed import all_ok
from phased_jax.errors import CheckpointError
from phased_jax.hf import mapping
from phased_jax.hf.hf_config import generation_config_from, hf_config_from
from phased_jax.hf.safetensors_shards import TensorSpec, parse_size, write_shards
from phased_jax.io_errors import raise_agreed
from phased_jax.model.config import ModelConfig
from phased_jax.model.params import abstract_params
from phased_jax.model.transformer import Transformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "vocab.json", "merges.txt")


@jax.jit
def _take_layer(x: jax.Array, i: jax.Array) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(x, i, keepdims=False)


@functools.partial(jax.jit, static_argnums=1)
def _take_layer_static(x: jax.Array, i: int) -> jax.Array:
    return x[i]


def _host(x: Any, layer: int | None = None) -> np.ndarray:
    """One leaf (or one layer of it) as a numpy array on this host, gathered from wherever it
    lives. A collective when `x` spans processes: every process must call it, in the same order.
    """
    if not isinstance(x, jax.Array):
        x = np.asarray(x)
        return x if layer is None else x[layer]
    if layer is not None:
        if x.sharding.shard_shape(x.shape)[0] != x.shape[0]:
            # Layers sharded: a dynamic index would all-gather the whole leaf first; a static
            # one moves only the slice (one compile per layer, only in this rare layout).
            x = _take_layer_static(x, layer)
        else:
            x = _take_layer(x, np.int32(layer))
    if not x.is_fully_addressable:
        return multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _check_params(params: dict, cfg: ModelConfig) -> None:
    abstract = abstract_params(cfg)
    extra = sorted(set(params) - set(abstract)) if isinstance(params, dict) else []
    if extra:  # e.g. an untied head under a tied config: exporting would drop it silently
        raise CheckpointError(f"params hold {extra[0]!r}, which this model config has no place "
                              f"for (tie_word_embeddings={cfg.tie_word_embeddings})")
    for rule in mapping.rules(cfg):
        want = mapping.get_path(abstract, rule.path).shape
        try:
            got = tuple(mapping.get_path(params, rule.path).shape)
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"params lack {'/'.join(rule.path)} for this model") from e
        if got != want:
            raise CheckpointError(f"params {'/'.join(rule.path)} has shape {list(got)}, "
                                  f"expected {list(want)} for this model config")


def hf_tensors(cfg: ModelConfig, params: dict, dtype: np.dtype | None = None
               ) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) in checkpoint order, converting one leaf slice at a time."""
    for rule, layer in mapping.slices(cfg):
        host = _host(mapping.get_path(params, rule.path), layer)
        for name, t in zip(rule.hf_names(layer), rule.to_hf(cfg, host), strict=True):
            yield name, (t if dtype is None else t.astype(dtype, copy=False))


def _gather_only(cfg: ModelConfig, params: dict) -> Iterator[None]:
    """The gathers of `hf_tensors` without the conversion: what a process that writes nothing
    does so that process 0's gathers complete."""
    for rule, layer in mapping.slices(cfg):
        _host(mapping.get_path(params, rule.path), layer)
        yield None


def tokenizer_files(directory: str | Path, under: str = "tokenizer") -> dict[str, Path]:
    """`under/NAME` -> file for each tokenizer file in `directory` (none if it is empty or ""):
    what a params checkpoint carries so that it converts and generates without --tokenizer."""
    if not directory:
        return {}
    return {f"{under}/{name}": Path(directory, name) for name in TOKENIZER_FILES
            if Path(directory, name).is_file()}


def _save_tokenizer(tokenizer: Any, directory: Path) -> None:
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(directory))
        return
    source = Path(tokenizer)
    found = [source / f for f in TOKENIZER_FILES if (source / f).is_file()]
    if not found:
        raise CheckpointError(f"{source}: no tokenizer files found (looked for {TOKENIZER_FILES})")
    for f in found:
        shutil.copy2(f, directory / f.name)


def save(path: str | Path, model: Transformer | ModelConfig, params: dict,
         tokenizer: Any = None, *, dtype: Any = None, max_shard_size: int | str = "5GB",
         overwrite: bool = False) -> Path:
    """Write `params` as an HF directory that `AutoModelForCausalLM.from_pretrained` loads.

    `tokenizer`: a transformers tokenizer or a directory holding tokenizer files. `dtype`: the
    tensors' dtype on disk (default: the params'). Shards above `max_shard_size` (bytes or
    '5GB'), with an index. The directory appears atomically (written beside it, then renamed;
    an old one is removed only after that). A full disk is one CheckpointError line.

    Multi-process: call it on every process with the same arguments; each takes part in
    gathering one leaf slice at a time, only process 0 writes, and all raise if it fails.
    """
    cfg = model.cfg if isinstance(model, Transformer) else model
    params = nn.meta.unbox(params)
    if set(params) == {"params"}:
        params = params["params"]
    _check_params(params, cfg)
    out_dtype = None if dtype is None else np.dtype(dtype)
    specs = []
    for name, shape in mapping.hf_tensor_specs(cfg):
        specs.append(TensorSpec(name, shape, out_dtype or np.dtype(cfg.param_dtype)))
    # Leaves may not all be in cfg.param_dtype (e.g. a user cast); on disk they all match specs.
    hf_cfg = hf_config_from(cfg, dtype=specs[0].dtype.name)
    target = Path(path).absolute()
    writer = jax.process_index() == 0
    error: BaseException | None = None
    output = contextlib.ExitStack()
    if writer:  # refuse (or clean up) before anyone gathers a tensor
        try:
            tmp = output.enter_context(atomic_directory(
                target, overwrite=overwrite, needed_bytes=sum(s.nbytes for s in specs)))
        except Exception as e:
            error = e
    if not all_ok(error is None):
        raise_agreed(error, target, "process 0 could not write the export")
    if writer:
        tensors = hf_tensors(cfg, params, specs[0].dtype)
        try:
            with output:
                write_shards(tmp, specs, tensors, parse_size(max_shard_size))
                (tmp / "config.json").write_text(
                    json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
                (tmp / "generation_config.json").write_text(
                    json.dumps(generation_config_from(cfg), indent=2) + "\n")
                if tokenizer is not None:
                    _save_tokenizer(tokenizer, tmp)
        except Exception as e:
            error = e
    else:
        tensors = _gather_only(cfg, params)
    if jax.process_count() > 1:  # the rest of the gathers, so none waits forever on process 0
        for _ in tensors:
            pass
    if not all_ok(error is None):
        raise_agreed(error, target, "process 0 could not write the export")
    return Path(path)


def export_complete(path: str | Path) -> bool:
    """Whether `path` holds a complete export (cheap: reads config.json, the index and each
    shard's 8-byte header length, then compares file sizes), e.g. before redoing it at resume.
    """
    directory = Path(path)
    try:
        json.loads((directory / "config.json").read_text())
        index = directory / "model.safetensors.index.json"
        files = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
                 if index.is_file() else ["model.safetensors"])
        for name in files:
            with open(directory / name, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                      default=0)
            if (directory / name).stat().st_size != 8 + n + end:
                return False
    except Exception:  # missing, torn or not ours: not a complete export
        return False
    return True
