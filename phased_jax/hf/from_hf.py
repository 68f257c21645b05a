"""HF directory -> (Transformer, params), one leaf at a time.

Every name and shape is checked against the table before any data is read, so a bad checkpoint
fails in a second, not after minutes of reading. Each of our leaves is filled layer by layer into
one host buffer, which on CPU becomes the jax Array without a copy (64-byte aligned buffers are
aliased by `jax.device_put`), so host memory peaks near one copy of the params.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from phased_jax.errors import CheckpointError
from phased_jax.hf import mapping
from phased_jax.hf.hf_config import read_config
from phased_jax.hf.tensor_files import TensorReader, open_checkpoint
from phased_jax.model.config import ModelConfig
from phased_jax.model.params import abstract_params
from phased_jax.model.quant import BLOCK_AXIS, QUANTISED, quantize
from phased_jax.model.transformer import Transformer


def _dtype_name(dtype: Any) -> str | None:
    return None if dtype is None else np.dtype(dtype).name


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype, align: int = 64) -> np.ndarray:
    """An uninitialised array whose data is `align`-byte aligned (so device_put can alias it)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def check_tensors(reader: TensorReader, cfg: ModelConfig, directory: Path) -> None:
    """Every tensor the config implies is present with the right shape, and nothing else is
    (a tied model's repeated head must equal the embedding)."""
    expected = dict(mapping.hf_tensor_specs(cfg))
    missing = [n for n in expected if n not in reader.shapes]
    if missing:
        raise CheckpointError(
            f"{directory}: missing tensor {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f" that config.json implies; files: {sorted({p.name for p in reader.files.values()})}")
    for name, shape in expected.items():
        if reader.shapes[name] != shape:
            raise CheckpointError(
                f"{reader.files[name]}: tensor {name!r} has shape {list(reader.shapes[name])}, "
                f"expected {list(shape)} from config.json")
    extra = sorted(n for n in reader.shapes if n not in expected and not mapping.IGNORED.fullmatch(n)
                   and not (cfg.tie_word_embeddings and n == mapping.TIED_HEAD))
    if extra:
        raise CheckpointError(
            f"{reader.files[extra[0]]}: unexpected tensor {extra[0]!r}"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            + "; it has no place in a plain Llama/Mistral model (biases? extra heads?)")
    if cfg.tie_word_embeddings and mapping.TIED_HEAD in reader.shapes:
        check_tied_head(reader, directory)


def check_tied_head(reader: TensorReader, directory: Path) -> None:
    """A tied checkpoint may repeat the embedding as the head (older exports do); a repeat that
    differs would be silently dropped, so it is refused."""
    head, embed = mapping.TIED_HEAD, mapping.EMBED_RULES[0].hf[0]
    if reader.shapes[head] != reader.shapes[embed] or not np.array_equal(reader.get(head),
                                                                         reader.get(embed)):
        raise CheckpointError(
            f"{reader.files[head]}: tensor {head!r} differs from {embed!r}, but config.json sets "
            "tie_word_embeddings=true (the head is the embedding); untie it or drop the tensor")


def read_params(reader: TensorReader, cfg: ModelConfig, shardings: Any = None,
                quantize_to: str = "") -> dict:
    """Our params pytree from `reader`, in `cfg.param_dtype`, one leaf at a time. With
    `quantize_to` ("int8", "nf4": a QLoRA base) each layer projection is quantised on the host,
    one layer at a time, and only its codes and scales go to the devices (`model.quant`)."""
    abstract = abstract_params(cfg)
    params: dict = {}
    for rule in mapping.rules(cfg):
        target = mapping.get_path(abstract, rule.path)
        name = rule.path[-1]
        if quantize_to and rule.layered and name in QUANTISED:
            _read_quantised(reader, cfg, rule, target, quantize_to, shardings, params)
            continue
        buf = aligned_empty(target.shape, target.dtype)
        for i in range(cfg.num_layers) if rule.layered else (None,):
            piece = rule.to_ours(cfg, [reader.get(n) for n in rule.hf_names(i)])
            (buf if i is None else buf[i])[...] = piece
            del piece
        sharding = None if shardings is None else mapping.get_path(shardings, rule.path)
        mapping.set_path(params, rule.path, jax.device_put(buf, sharding))
        del buf
    return params


def _read_quantised(reader: TensorReader, cfg: ModelConfig, rule: Any, target: Any, qtype: str,
                    shardings: Any, params: dict) -> None:
    """One stacked projection, read and quantised a layer at a time (`read_params`)."""
    name, axis = rule.path[-1], BLOCK_AXIS[rule.path[-1]]
    codes = absmax = None
    for i in range(cfg.num_layers):
        piece = np.asarray(rule.to_ours(cfg, [reader.get(n) for n in rule.hf_names(i)]),
                           target.dtype)  # rounded to param_dtype first, as set_base would
        c, a = quantize(piece[None], qtype, axis)
        if codes is None:
            codes = np.empty((cfg.num_layers,) + c.shape[1:], c.dtype)
            absmax = np.empty((cfg.num_layers,) + a.shape[1:], a.dtype)
        codes[i], absmax[i] = c[0], a[0]
        del piece
    for suffix, value in (("_q", codes), ("_absmax", absmax)):
        path = rule.path[:-1] + (name + suffix,)
        sharding = None if shardings is None else mapping.get_path(shardings, path)
        mapping.set_path(params, path, jax.device_put(value, sharding))


def load(path: str | Path, dtype: Any = None, *, compute_dtype: Any = None,
         shardings: Any = None, allow_pickle: bool = False, quantize_to: str = ""
         ) -> tuple[Transformer, dict]:
    """Load a local HF Llama/Mistral directory as `(model, params)`.

    `dtype` is the params' dtype (default: the checkpoint's `dtype` in config.json, else float32);
    `compute_dtype` the activations' (default: `dtype`). `shardings` is an optional pytree of
    `jax.sharding.Sharding` shaped like params. Use as `model.apply({"params": params}, ids)`.
    `quantize_to`: a QLoRA base's projections quantised as read (`read_params`).
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    cfg = read_config(directory)
    param_dtype = _dtype_name(dtype) or cfg.param_dtype
    cfg = cfg.replace(param_dtype=param_dtype, dtype=_dtype_name(compute_dtype) or param_dtype)
    reader = open_checkpoint(directory, allow_pickle=allow_pickle)
    check_tensors(reader, cfg, directory)
    return Transformer(cfg), read_params(reader, cfg, shardings, quantize_to)
