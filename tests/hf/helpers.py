"""Helpers shared by the HF conversion tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def read_safetensors_dir(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory (single file or shards) as numpy."""
    from safetensors import safe_open

    out = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


def assert_same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert np.array_equal(a[name].view(np.uint8), b[name].view(np.uint8)), name


def padded_batch(vocab: int, seq: int, valid: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention mask) of two rows of `seq` random tokens; row 1 right-padded after `valid`."""
    ids = np.random.RandomState(0).randint(3, vocab, size=(2, seq))
    mask = np.ones((2, seq), np.int64)
    mask[1, valid:] = 0
    ids[1, valid:] = 0
    return ids, mask
