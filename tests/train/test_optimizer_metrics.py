import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phased_jax.config import get_default_config
from phased_jax.train import build_trainer
from phased_jax.train import metrics as M
from phased_jax.train.optimizer import (
    decay_mask,
    make_optimizer,
    run_length,
    scale_by_run_schedule,
    schedule_state,
    start_run,
    warmup_steps,
)


def run_lrs(tc, num_steps: int, updates: int) -> list[float]:
    """The LR of each of the first `updates` updates of a run, through the schedule transform
    the optimizer chain ends with (a unit update comes out as -LR)."""
    tx = scale_by_run_schedule(tc)
    ones = {"w": jnp.ones(())}
    state = start_run(tx.init(ones), *run_length(tc, num_steps))
    update = jax.jit(tx.update)
    lrs = []
    for _ in range(updates):
        out, state = update(ones, state)
        lrs.append(-float(out["w"]))
        assert float(state.lr) == lrs[-1]  # the state reports the LR it applied
    return lrs


def test_warmup_cosine_sized_to_the_run():
    tc = get_default_config().train  # lr 5e-6, warmup 0.1, cosine: the paper's settings
    sched = run_lrs(tc, num_steps=100, updates=101)
    assert sched[0] == 0.0
    assert sched[5] == pytest.approx(2.5e-6)
    assert sched[10] == pytest.approx(5e-6)
    assert sched[55] == pytest.approx(2.5e-6, rel=1e-4)  # half-way through the decay
    assert sched[100] == pytest.approx(0.0, abs=1e-12)
    assert run_lrs(tc, num_steps=20, updates=3)[2] == pytest.approx(5e-6)  # new run, new schedule


@pytest.mark.parametrize("ratio, steps", [(0.15, 100), (0.3, 50), (0.07, 100), (0.1, 27)])
def test_warmup_steps_counted_as_transformers_does(ratio, steps):
    """ceil(ratio * steps) in float64 on the host, as transformers' Trainer; float32 on device
    gives 16 for 0.15 x 100 and 7 for 0.07 x 100."""
    import math

    from tests.train.helpers import tiny_config

    config = tiny_config()
    config.train.update(warmup_ratio=ratio, schedule="cosine")
    want = math.ceil(ratio * steps)
    assert warmup_steps(config.train, steps) == want
    state = build_trainer(config).init_state(steps)
    assert int(schedule_state(state.opt_state).warmup_steps) == want
    lr = float(config.train.lr)
    sched = run_lrs(config.train, steps, want + 1)
    assert sched[want - 1] == pytest.approx(lr * (want - 1) / want, rel=1e-6)
    assert sched[want] == pytest.approx(lr, rel=1e-6)  # the peak, then decay


def test_eval_loss_in_micro_batches_equals_one_batch():
    """Eval honours grad_accum (so it fits wherever training fits) with the same sums."""
    from tests.train.helpers import fixed_batch, tiny_config

    sums = []
    for accum in (1, 4):  # 2 batch shards: micro-batches of 2 rows
        trainer = build_trainer(tiny_config((2, 1, 1), grad_accum=accum), devices=jax.devices()[:2])
        params = trainer.init_state(1).params
        out = jax.device_get(trainer.eval_loss(params, trainer.shard_batch(fixed_batch())))
        sums.append((float(out["ce_sum"]), float(out["loss_tokens"])))
    assert sums[1][1] == sums[0][1]
    assert sums[1][0] == pytest.approx(sums[0][0], rel=1e-6)  # float32 sums, reordered


def test_adamw_paper_defaults_and_no_decay_on_norms():
    tc = get_default_config().train
    assert (tc.b1, tc.b2, tc.weight_decay, tc.clip_norm) == (0.9, 0.95, 0.1, 1.0)
    params = {"layers": {"attn_norm": {"scale": jnp.ones((2, 4))}, "mlp": {"wo": jnp.ones((2, 4))}}}
    assert decay_mask(params) == {"layers": {"attn_norm": {"scale": False}, "mlp": {"wo": True}}}
    tc.update(lr=1.0, warmup_ratio=0.0, schedule="constant")
    tx = make_optimizer(tc)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, start_run(tx.init(params), *run_length(tc, 10)), params)
    assert float(updates["layers"]["attn_norm"]["scale"].max()) == 0.0  # no decay
    assert float(updates["layers"]["mlp"]["wo"].max()) == pytest.approx(-0.1)  # -lr * wd * w


def test_peak_flops_table_and_config_override():
    class Dev:
        device_kind = "TPU v5 lite"
    assert M.peak_flops_per_device(Dev())[0] == 197e12
    Dev.device_kind = "NVIDIA H100 80GB HBM3"
    assert M.peak_flops_per_device(Dev())[0] == 989e12
    assert M.peak_flops_per_device(Dev(), configured=1e9) == (1e9, "config.train.peak_flops")


def test_metrics_writer_jsonl_tensorboard_mfu(tmp_path):
    w = M.MetricsWriter(tmp_path, flops_per_step=1e9, tokens_per_step=1000, peak_flops_total=1e12,
                        total_steps=4, log_every=2, console=False)
    for step in range(1, 5):
        w.write(step, {"loss": jnp.float32(2.0 / step), "grad_norm": jnp.float32(1.0)})
    w.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 4]
    last = records[-1]
    assert last["loss"] == 0.5 and last["tokens_per_s"] > 0
    assert last["mfu"] == pytest.approx(1e9 / last["step_time_s"] / 1e12)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_matmul_probe_is_a_positive_rate():
    assert M.probe_matmul_flops(n=128, repeats=2) > 1e6
    assert np.isfinite(M.probe_matmul_flops(n=64, repeats=1))
