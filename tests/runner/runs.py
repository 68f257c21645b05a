"""Helpers: write a tiny experiment config, run `phased-jax train` in a subprocess, read results."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from phased_jax.config_cli import load_config_file
from phased_jax.data.pipeline import Batching, prepare
from phased_jax.params_checkpoint import load_params
from phased_jax.train.trainer import build_trainer
from tests.xla import xla_flags

REPO = Path(__file__).resolve().parents[2]
# A local pod of 2 processes x 1 device (a fifth less CPU than x 4; test_lora_variants' pod has
# 4 devices a process)
POD = ("--local-pod", "2", "--local-devices", "1")

CONFIG = '''
from phased_jax.config import get_default_config, model_section

def get_config():
    c = get_default_config()
    c.output_dir = "{out}"
    c.model = model_section("tiny-llama", vocab_size={vocab})
    c.data.paths = ("{data}",)
    c.data.tokenizer = "{tok}"
    c.data.max_length = 48
    c.train.global_batch = 8
    c.train.epochs_per_phase = 1
    c.train.lr = 1e-3
    # Adam with a large eps: an update is then proportional to its gradient, so runs that differ
    # only in float reduction order (other meshes, processes) differ by float noise, not by
    # +-lr steps on entries whose gradient is noise (eps=1e-8 turns noise into a full step).
    c.train.eps = 1e-3
    c.train.log_every = 1
    c.model.dtype = "float32"  # float32 noise, not bfloat16 rounding, between meshes
    c.train.peak_flops = 1e11
    c.checkpoint.every_steps = 2
    c.checkpoint.keep = 2
    # The forgetting matrix and replay in every run the resume tests kill and compare
    c.data.eval_fraction = 0.1
    c.data.replay = 0.5
    c.export.dtype = "float32"
{extra}
    return c
'''



def write_config(exp: dict, out: Path, name: str = "cfg.py", extra: str = "") -> Path:
    """The tiny experiment's config file for output dir `out`; `extra`: more `c.x = y` lines."""
    path = out.parent / f"{out.name}_{name}"
    lines = "".join(f"    {line.strip()}\n" for line in extra.splitlines() if line.strip())
    path.write_text(CONFIG.format(out=out, vocab=exp["vocab"], data=exp["data"], tok=exp["tok"],
                                  extra=lines.rstrip("\n")))
    return path


def train(config: Path, *args: str, devices: int = 8, env: dict | None = None,
          check: bool = True, kill_after: int | None = None,
          hooks: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`phased-jax train` in a fresh process (as a user or a pod worker runs it), with the
    tests' hooks (tests/runner/hooked_train.py): every run logs its reads; `kill_after=N`
    SIGKILLs it right after global step N; `hooks`: more of hooked_train's options. It runs
    in a session (process group) of its own, as a TPU host's job: a hook's notice to its
    process group stays there."""
    full_env = dict(os.environ, JAX_PLATFORMS="cpu",
                    XLA_FLAGS=xla_flags(devices), **(env or {}))
    hooks = ("--log-reads", *(["--kill-after", str(kill_after)] if kill_after else []), *hooks)
    proc = subprocess.run([sys.executable, "-m", "tests.runner.hooked_train", *hooks,
                           "--config", str(config), *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=600, start_new_session=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def phase_params(directory: Path) -> dict:
    """A `phases/` directory's params (host numpy), by path."""
    import jax
    import numpy as np

    from phased_jax.params_checkpoint import load_params

    _, params = load_params(directory)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def final_params(out: Path) -> dict:
    """The last phase's params (float32, host numpy), by path."""
    return phase_params(sorted((out / "phases").iterdir())[-1])


def metrics(out: Path) -> dict[int, dict]:
    """metrics.jsonl's training rows by global step (the config logs every step)."""
    lines = (out / "logs" / "metrics.jsonl").read_text().splitlines()
    return {e["step"]: e for e in map(json.loads, lines) if e["phase"] != "eval"}


def phase_events(out: Path, event: str) -> list[dict]:
    lines = (out / "logs" / "phase_log.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == event]


def fresh_stage_losses(out: Path, config_file: Path) -> dict[int, dict[str, float]]:
    """Each `phases/` params checkpoint, loaded fresh in this process (its own Trainer and
    mesh), evaluated on each stage's held-out examples: {phase: {stage: loss}}."""
    config = load_config_file(str(config_file))
    trainer = build_trainer(config)
    batching = Batching.from_sections(config.train, config.data, config.seed)
    prepared = prepare(config.data, batching, config.output_dir, write_report=False)
    dirs = sorted((out / "phases").iterdir(), key=lambda p: int(p.name[5:].split("-")[0]))
    losses = {}
    for k, d in enumerate(dirs):
        _, params = load_params(d, trainer.param_shardings)
        losses[k + 1] = {}
        for se in prepared.stage_evals:
            ce = tokens = 0.0
            loader = batching.loader(se.examples, k, evaluation=True)
            for s in range(loader.steps):
                m = trainer.eval_loss(params, trainer.shard_batch(loader.batch(s)))
                ce, tokens = ce + float(m["ce_sum"]), tokens + float(m["loss_tokens"])
            losses[k + 1][se.stage.name] = ce / tokens
    return losses


def assert_matrix_is_fresh_eval(out: Path, config_file: Path, rel: float = 1e-6) -> None:
    """Every forgetting-matrix entry the run logged equals a fresh evaluation of its phase's
    saved params; forgetting.csv holds the same numbers."""
    logged = {e["phase"]: e["stage_losses"] for e in phase_events(out, "eval")
              if e["at_phase_end"]}
    fresh = fresh_stage_losses(out, config_file)
    assert sorted(logged) == sorted(fresh) and fresh
    for k, row in fresh.items():
        assert logged[k].keys() == row.keys()
        for j, v in row.items():
            assert abs(logged[k][j] - v) <= rel * abs(v), (k, j, logged[k][j], v)
    rows = list(csv.DictReader(io.StringIO((out / "forgetting.csv").read_text())))
    for k, row in logged.items():
        line = rows[k - 1]
        assert line["row"] == f"after phase {k}"
        for j, v in row.items():
            assert float(line[f"stage {j}"]) == float(f"{v:.6g}")


def step_lines(out: Path) -> list[int]:
    lines = (out / "logs" / "phase_log.jsonl").read_text().splitlines()
    return [e["step"] for e in map(json.loads, lines) if e["event"] == "step"]
