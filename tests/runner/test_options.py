"""Config options the paper's runs leave off, checked against what they promise: one LR
schedule and one optimizer across phases (`train.schedule_scope=run`), and the eval loss on
held-out examples (`data.eval_fraction`) equal to a per-example computation."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from phased_jax.config_cli import load_config_file
from phased_jax.data.pipeline import Batching, prepare
from phased_jax.model import Transformer
from phased_jax.params_checkpoint import load_params
from phased_jax.train.optimizer import lr_at, warmup_steps
from tests.runner.runs import metrics, train, write_config


@pytest.fixture(scope="module")
def options_run(tiny_experiment, tmp_path_factory):
    out = tmp_path_factory.mktemp("options") / "run"
    cfg = write_config(tiny_experiment, out, extra="""
        c.train.schedule_scope = "run"
        c.train.schedule = "cosine"
        c.train.warmup_ratio = 0.1
        c.data.eval_fraction = 0.25
        c.export.at_end = False""")
    train(cfg)
    return cfg, out


def test_run_schedule_scope_runs_one_schedule_over_every_phase(options_run):
    cfg, out = options_run
    tc = load_config_file(str(cfg)).train
    by_step = metrics(out)
    total = max(by_step)
    events = [json.loads(x) for x in (out / "logs" / "phase_log.jsonl").read_text().splitlines()]
    ends = [e["step"] for e in events if e["event"] == "phase_end"]
    assert len(ends) == 3 and ends[-1] == total
    # A fresh optimizer per phase would restart the warmup at each phase end; a carried one
    # runs global step s (1-based) at the LR of update s - 1 of a run of `total` steps.
    warm = warmup_steps(tc, total)
    for s, m in by_step.items():
        assert m["lr"] == pytest.approx(float(lr_at(tc, s - 1, total, warm)), rel=1e-5), s
    assert by_step[ends[0] + 1]["lr"] > by_step[1]["lr"]  # no restart at the phase boundary


def test_eval_loss_is_the_mean_response_token_loss_of_the_held_out_examples(options_run):
    cfg, out = options_run
    config = load_config_file(str(cfg))
    prepared = prepare(config.data, Batching.from_sections(config.train, config.data, config.seed),
                       config.output_dir, write_report=False)
    events = [json.loads(x) for x in (out / "logs" / "phase_log.jsonl").read_text().splitlines()]
    evals = {e["phase"]: e["eval_loss"] for e in events if e["event"] == "eval"}
    assert sorted(evals) == [1, 2, 3]
    phase_dirs = sorted((out / "phases").iterdir())
    for k, phase in enumerate(prepared.phases):
        held = phase.eval_examples
        assert held is not None and len(held) > 0
        model_cfg, params = load_params(phase_dirs[k])
        apply = jax.jit(Transformer(model_cfg).apply)
        total, count = 0.0, 0
        for i in range(len(held)):  # one unpadded example at a time: no batching, no packing
            ids, prompt = held.example(i)
            logits = np.asarray(apply({"params": params}, ids[None, :])[0], np.float64)
            lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
            t = np.arange(max(prompt - 1, 0), len(ids) - 1)
            total += float(np.sum(lse[t] - logits[t, ids[t + 1]]))
            count += len(t)
        # float32 logits, summed in another order: relative error ~1e-6 per token
        assert evals[k + 1] == pytest.approx(total / count, rel=1e-4), k
