"""Read an HF checkpoint's tensors one at a time, knowing which file holds each.

safetensors files are reopened for every tensor: `safe_open` memory-maps the whole file and the
pages it touches stay resident until the map closes, so one long-lived handle would end up
holding a second copy of the checkpoint in RSS. Pickle (`.bin`) weights run code when
unpickled; they are read only when the caller allows it, and then with `weights_only=True`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from phased_jax.errors import CheckpointError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


class TensorReader:
    """Names, shapes and data of a checkpoint's tensors; `get` reads one tensor from disk."""

    def __init__(self, files: dict[str, Path], shapes: dict[str, tuple[int, ...]]):
        self.files = files  # tensor name -> file
        self.shapes = shapes

    def get(self, name: str) -> np.ndarray:
        raise NotImplementedError


class SafetensorsReader(TensorReader):
    def get(self, name: str) -> np.ndarray:
        path = self.files[name]
        try:
            with safe_open(str(path), framework="numpy") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r}: {e}") from e


class TorchBinReader(TensorReader):
    """Pickled PyTorch weights, loaded lazily (mmap) one file at a time."""

    def __init__(self, files: dict[str, Path], shapes: dict[str, tuple[int, ...]], tensors: dict):
        super().__init__(files, shapes)
        self._tensors = tensors

    def get(self, name: str) -> np.ndarray:
        import torch

        t = self._tensors[name]
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16; widen exactly
            return t.to(torch.float32).numpy()
        return t.numpy()


def _weight_map(index_path: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: unreadable index (needs a 'weight_map'): {e}") from e
    files = {name: index_path.parent / file for name, file in weight_map.items()}
    for file in sorted(set(files.values())):
        if not file.is_file():
            raise CheckpointError(f"{index_path}: lists shard {file.name}, which is missing")
    return files


def _safetensors_reader(directory: Path) -> SafetensorsReader:
    index = directory / SAFE_INDEX
    if index.is_file():
        indexed = _weight_map(index)
        paths = sorted(set(indexed.values()))
    else:
        indexed, paths = None, [directory / SAFE_SINGLE]
    files: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for path in paths:
        try:
            with safe_open(str(path), framework="numpy") as f:
                for name in f.keys():
                    files[name] = path
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{path}: not a valid safetensors file (truncated or corrupt?): {e}") from e
    if indexed is not None:
        for name, path in indexed.items():
            if files.get(name) != path:
                raise CheckpointError(f"{index}: maps tensor {name!r} to {path.name}, "
                                      "which does not contain it")
    return SafetensorsReader(files, shapes)


def _torch_reader(directory: Path) -> TorchBinReader:
    import torch

    index = directory / BIN_INDEX
    paths = (sorted(set(_weight_map(index).values())) if index.is_file()
             else [directory / BIN_SINGLE])
    files, shapes, tensors = {}, {}, {}
    for path in paths:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for a bad pickle
            raise CheckpointError(f"{path}: cannot read PyTorch weights: {e}") from e
        for name, t in state.items():
            files[name], shapes[name], tensors[name] = path, tuple(t.shape), t
    return TorchBinReader(files, shapes, tensors)


def open_checkpoint(directory: Path, allow_pickle: bool = False) -> TensorReader:
    """A reader for the weights in an HF directory: safetensors first, pickle only if allowed."""
    directory = Path(directory)
    if (directory / SAFE_INDEX).is_file() or (directory / SAFE_SINGLE).is_file():
        return _safetensors_reader(directory)
    bins = [p for p in (directory / BIN_INDEX, directory / BIN_SINGLE) if p.is_file()]
    if bins:
        if not allow_pickle:
            raise CheckpointError(
                f"{bins[0]}: pickle (.bin) weights can run arbitrary code when loaded; refusing. "
                "Convert them to safetensors, or pass allow_pickle=True (CLI: --allow-pickle) "
                "if you trust this file")
        return _torch_reader(directory)
    raise CheckpointError(f"{directory}: no weights found (expected {SAFE_SINGLE}, {SAFE_INDEX}, "
                          f"or with allow_pickle {BIN_SINGLE})")
