"""A tiny model config and a fixed batch shared by the training tests."""

from __future__ import annotations

import numpy as np
from ml_collections import ConfigDict

from phased_jax.config import get_default_config, model_section

SEQ = 16


def tiny_config(mesh_shape=(1, -1, 1), global_batch: int = 8, grad_accum: int = 1,
                lr: float = 1e-3) -> ConfigDict:
    """f32 everywhere, constant LR, so runs on different meshes are comparable to ~1e-6."""
    c = get_default_config()
    c.model = model_section("tiny-llama", vocab_size=128, hidden_size=32, intermediate_size=64,
                            num_heads=4, num_kv_heads=2, dtype="float32", param_dtype="float32")
    c.data.max_length = SEQ
    c.train.update(global_batch=global_batch, grad_accum=grad_accum, lr=lr, warmup_ratio=0.0,
                   schedule="constant", tensorboard=False)
    c.mesh.shape = mesh_shape
    return c


def fixed_batch(batch: int = 8, seq: int = SEQ, seed: int = 0) -> dict[str, np.ndarray]:
    """Prompt tokens masked out, response tokens in the loss, two packed examples in row 0, padding."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, 128, (batch, seq + 1)).astype(np.int32)
    seg = np.ones((batch, seq), np.int32)
    pos = np.tile(np.arange(seq, dtype=np.int32), (batch, 1))
    mask = np.zeros((batch, seq), np.int32)
    mask[:, seq // 4:] = 1  # response = the last 3/4
    seg[0, seq // 2:] = 2  # row 0 packs a second example
    pos[0, seq // 2:] -= seq // 2
    seg[1, -4:] = 0  # row 1 ends in padding
    mask[1, -4:] = 0
    return dict(input_ids=ids[:, :-1], targets=ids[:, 1:], loss_mask=mask, segment_ids=seg,
                positions=pos)
