"""Config options the paper's runs leave off, checked against what they promise: one LR
schedule and one optimizer across phases (`train.schedule_scope=run`), exact across a phase
boundary; held-out losses every `train.eval_every` steps; a stage's held-out loss equal to a
per-example computation."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import optax
import pytest

from phased_jax.checkpoint import RunCheckpoints
from phased_jax.config_cli import load_config_file
from phased_jax.data.pipeline import Batching, prepare
from phased_jax.model import Transformer
from phased_jax.params_checkpoint import load_params
from phased_jax.train.trainer import build_trainer
from tests.runner.runs import final_params, metrics, phase_events, step_lines, train, write_config

pytestmark = pytest.mark.slow
OPTIONS = """
    c.train.schedule_scope = "run"
    c.train.schedule = "cosine"
    c.train.warmup_ratio = 0.1
    c.train.eval_every = 4
    c.data.eval_fraction = 0.25
    c.checkpoint.every_steps = 100
    c.export.at_end = False"""


@pytest.fixture(scope="module")
def options_run(tiny_experiment, tmp_path_factory):
    out = tmp_path_factory.mktemp("options") / "run"
    cfg = write_config(tiny_experiment, out, extra=OPTIONS)
    train(cfg)
    return cfg, out


def _ends(out) -> list[int]:
    return [e["step"] for e in phase_events(out, "phase_end")]


def test_run_scope_follows_one_warmup_cosine_over_all_steps(options_run):
    cfg, out = options_run
    tc = load_config_file(str(cfg)).train
    by_step, ends = metrics(out), _ends(out)
    total = ends[-1]
    assert len(ends) == 3 and sorted(by_step) == list(range(1, total + 1))
    # built here, independently: optax's warmup + cosine over the whole run's steps
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.lr, warmup_steps=math.ceil(0.1 * total),
        decay_steps=total, end_value=0.0)
    for s, m in by_step.items():  # global step s runs update s - 1
        assert m["lr"] == pytest.approx(float(schedule(s - 1)), rel=1e-5, abs=1e-12), s
    assert by_step[ends[0] + 1]["lr"] < by_step[ends[0]]["lr"]  # no warmup again


def test_run_scope_carries_adam_across_phase_boundaries(options_run):
    cfg, out = options_run
    config = load_config_file(str(cfg))
    trainer = build_trainer(config)
    ckpts = RunCheckpoints(str(out / "checkpoints"), keep=3, phase_end_steps=_ends(out))
    state, meta = ckpts.restore_latest(trainer.abstract_state(), config.to_json())
    ckpts.close()
    assert meta["phase_index"] == 2 and meta["phase_done"]
    adam = optax.tree_utils.tree_get(state.opt_state, "ScaleByAdamState")
    # a fresh optimizer per phase would count only phase 3's steps
    assert int(adam.count) == _ends(out)[-1] == int(state.step)


def test_run_scope_resumes_exactly_across_a_phase_boundary(tiny_experiment, options_run,
                                                          tmp_path):
    _, ref = options_run
    out = tmp_path / "run"
    cfg = write_config(tiny_experiment, out, extra=OPTIONS)
    kill = _ends(ref)[0] + 2  # only phase ends are checkpointed: resumes from phase 1's end
    assert train(cfg, kill_after=kill, check=False).returncode == -9
    resumed = train(cfg)
    assert f"resuming phase 1 at step {_ends(ref)[0]}/" in resumed.stdout
    assert step_lines(out) == list(range(1, _ends(ref)[-1] + 1))
    a, b = final_params(out), final_params(ref)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert metrics(out)[kill]["lr"] == metrics(ref)[kill]["lr"]


def test_eval_every_logs_held_out_losses_between_phase_ends(options_run):
    _, out = options_run
    evals = phase_events(out, "eval")
    mid = [e["step"] for e in evals if not e["at_phase_end"]]
    ends = _ends(out)
    assert mid == [s for s in range(4, ends[-1], 4) if s not in ends]
    assert [e["step"] for e in evals if e["at_phase_end"]] == ends
    rows = {r["step"] for r in map(json.loads,
                                   (out / "logs" / "metrics.jsonl").read_text().splitlines())
            if r["phase"] == "eval"}
    assert rows == set(mid) | set(ends)


def test_stage_loss_is_the_mean_response_token_loss_of_its_held_out_examples(options_run):
    cfg, out = options_run
    config = load_config_file(str(cfg))
    prepared = prepare(config.data, Batching.from_sections(config.train, config.data, config.seed),
                       config.output_dir, write_report=False)
    logged = {e["phase"]: e["stage_losses"] for e in phase_events(out, "eval") if e["at_phase_end"]}
    phase_dirs = sorted((out / "phases").iterdir())
    model_cfg, params = load_params(phase_dirs[1])
    apply = jax.jit(Transformer(model_cfg).apply)
    for se in prepared.stage_evals:
        held = se.examples
        assert len(held) > 0
        # Every example alone in its row, padded at the end to one length (the causal mask keeps
        # padding out of the real positions' logits): one call, no batching of examples together.
        rows = np.zeros((len(held), held.max_length), np.int32)
        for i in range(len(held)):
            ids, _ = held.example(i)
            rows[i, :len(ids)] = ids
        all_logits = np.asarray(apply({"params": params}, rows), np.float64)
        total, count = 0.0, 0
        for i in range(len(held)):
            ids, trained = held.example(i)
            prompt = int(np.argmax(trained))
            logits = all_logits[i, :len(ids)]
            lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
            t = np.arange(max(prompt - 1, 0), len(ids) - 1)
            total += float(np.sum(lse[t] - logits[t, ids[t + 1]]))
            count += len(t)
        # float32 logits, summed in another order: relative error ~1e-6 per token
        assert logged[2][se.stage.name] == pytest.approx(total / count, rel=1e-4), se.stage.name
