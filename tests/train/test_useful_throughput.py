"""Useful throughput: `useful_tokens_per_s` and `useful_mfu` are the padded figures times the
fraction of non-padding tokens over the steps between two log points."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from phased_jax.train import metrics as M
from phased_jax.train.loss import useful_tokens
from tests.train.helpers import SEQ, fixed_batch


def test_useful_figures_scale_by_the_padding_fraction(tmp_path):
    batch = fixed_batch()  # row 1 ends in 4 padding tokens
    padded = batch["segment_ids"].size
    real = int(useful_tokens({k: jnp.asarray(v) for k, v in batch.items()}))
    assert real == padded - 4 == 8 * SEQ - 4
    # steps 3 and 4 (one log window) have different padding: the window's fraction is their sum
    counts = [padded, padded, real, padded // 2]
    w = M.MetricsWriter(tmp_path, flops_per_step=1e9, tokens_per_step=padded,
                        peak_flops_total=1e12, total_steps=4, log_every=2, console=False,
                        tensorboard=False)
    for step, n in enumerate(counts, 1):
        w.write(step, {"loss": jnp.float32(1.0), "useful_tokens": jnp.int32(n)})
    w.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 4]
    assert "useful_tokens_per_s" not in records[0]  # the compile step has no timing
    assert records[1]["useful_fraction"] == 1.0
    assert records[1]["useful_tokens_per_s"] == pytest.approx(records[1]["tokens_per_s"])
    last = records[2]
    fraction = (real + padded // 2) / (2 * padded)
    assert last["useful_fraction"] == pytest.approx(fraction, rel=1e-12)
    assert last["useful_tokens_per_s"] == pytest.approx(last["tokens_per_s"] * fraction, rel=1e-12)
    assert last["useful_mfu"] == pytest.approx(last["mfu"] * fraction, rel=1e-12)
    assert last["useful_mfu"] < last["mfu"] and np.isfinite(last["useful_mfu"])
