"""Write safetensors shards tensor by tensor (published atomically by `atomic_dir.atomic_directory`).

`safetensors.numpy.save_file` wants a whole shard's tensors in memory (and copies each to bytes).
The format is simple enough to stream instead: the header needs only names, dtypes and shapes,
which we know before any tensor is converted, so each tensor is written as soon as it exists.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from phased_jax.errors import CheckpointError

SAFETENSORS_DTYPES = {
    np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float64): "F64",
}
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or a string like '5GB', '500MB', '2GiB' (as transformers takes)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b)?\s*", size.lower())
    if not m:
        raise ValueError(f"cannot parse size {size!r}; use bytes or e.g. '5GB', '500MB'")
    return int(float(m.group(1)) * _UNITS[m.group(2) or "b"])


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors grouped so each shard stays under the limit (a bigger tensor alone)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(specs: list[TensorSpec]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": SAFETENSORS_DTYPES[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def write_shards(directory: Path, specs: list[TensorSpec],
                 tensors: Iterator[tuple[str, np.ndarray]], max_shard_bytes: int) -> list[Path]:
    """Write `tensors` (yielded in `specs` order) as `model.safetensors`, or as
    `model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json` when over the limit."""
    shards = plan_shards(specs, max_shard_bytes)
    n = len(shards)
    names = (["model.safetensors"] if n == 1
             else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)])
    for file, shard in zip(names, shards, strict=True):
        with open(directory / file, "wb") as f:
            f.write(_header(shard))
            for spec in shard:
                name, array = next(tensors)
                if (name, tuple(array.shape), array.dtype) != (spec.name, spec.shape, spec.dtype):
                    raise CheckpointError(
                        f"internal: expected {spec.name} {spec.shape} {spec.dtype}, "
                        f"got {name} {array.shape} {array.dtype}")
                f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    if n > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                 "weight_map": {s.name: file for file, shard in zip(names, shards, strict=True)
                                for s in shard}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [directory / f for f in names]
