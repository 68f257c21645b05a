"""Weights & Biases tracking (`train.wandb`), offline: a run killed and resumed is one W&B run
whose rows are TensorBoard's scalars at TensorBoard's steps, plus phase ends and eval losses.

The W&B files are read as W&B writes them: `run-<id>.wandb` is a LevelDB-style log (32 KiB
blocks of chunks with a 7-byte header) of `wandb_internal_pb2.Record`s after a 7-byte file
header; TensorBoard's event files are TFRecords of `Event`s.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ml_collections import ConfigDict

from phased_jax.config import get_default_config
from phased_jax.config_checks import validate_config
from phased_jax.errors import ConfigError
from tests.runner.runs import REPO, step_lines, train, write_config

pytestmark = pytest.mark.slow  # two tiny training runs in subprocesses: ~40 s on 2 cores

PHASE_ENDS = (3, 6, 9)  # train.max_steps_per_phase = 3
KILL_AFTER = 4  # phase 2's first step: the last checkpoint is phase 1's end, so step 4 reruns
OURS = {"global_step", "phase", "phase_end"}  # what W&B gets beyond TensorBoard


def _wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    pos, chunks, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def _history(records: list) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
             for item in r.history.item} for r in records if r.HasField("history")]


def _tensorboard(log_dir: Path) -> dict[tuple[str, int], float]:
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in sorted((log_dir / "tensorboard").glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                scalars[(v.tag, event.step)] = v.simple_value
    return scalars


def _wandb_core_pids() -> set[int]:
    pids = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"wandb-core" in (proc / "cmdline").read_bytes():
                pids.add(int(proc.name))
        except OSError:
            pass
    return pids


@pytest.fixture(scope="module")
def resumed(tiny_experiment, tmp_path_factory):
    """A run with W&B (WANDB_MODE=offline) SIGKILLed after step 4, then rerun to the end."""
    root = tmp_path_factory.mktemp("wandb")
    out = root / "run"
    cfg = write_config(tiny_experiment, out, extra="""
        c.name = "wandb-test"
        c.train.wandb.project = "phased-test"
        c.train.wandb.tags = ("test", "tiny")
        c.train.max_steps_per_phase = 3
        c.data.eval_fraction = 0.25
        c.export.at_end = False""")
    no_network = "http://127.0.0.1:9"  # a proxy that refuses: any connection attempt fails
    env = {"WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(root / "config"),
           "WANDB_CACHE_DIR": str(root / "cache"), "WANDB_DATA_DIR": str(root / "data"),
           "WANDB_API_KEY": "", "https_proxy": no_network, "http_proxy": no_network}
    before = _wandb_core_pids()
    killed = train(cfg, env=env, kill_after=KILL_AFTER, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    first_id = (out / "logs" / "wandb_run_id").read_text().strip()
    deadline = time.time() + 20  # W&B's service follows its parent (--pid) out
    while _wandb_core_pids() - before and time.time() < deadline:
        time.sleep(0.2)
    leftover = _wandb_core_pids() - before
    rerun = train(cfg, env=env)
    assert "resuming phase" in rerun.stdout
    return {"out": out, "first_id": first_id, "leftover": leftover,
            "leftover_after": _wandb_core_pids() - before}


def test_offline_files_and_the_run_id_survive_a_kill(resumed):
    out, run_id = resumed["out"], resumed["first_id"]
    assert (out / "logs" / "wandb_run_id").read_text().strip() == run_id
    attempts = sorted((out / "logs" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(attempts) == 2, list((out / "logs" / "wandb").iterdir())
    for attempt in attempts:
        records = _wandb_records(attempt / f"run-{run_id}.wandb")
        runs = [r.run for r in records if r.HasField("run")]
        assert runs and {r.run_id for r in runs} == {run_id}
        assert {r.project for r in runs} == {"phased-test"}
        assert {tuple(r.tags) for r in runs} == {("test", "tiny")}
        assert {r.display_name for r in runs} == {"wandb-test"}
        config = {i.key: json.loads(i.value_json) for r in runs for i in r.config.update}
        assert config["train"]["max_steps_per_phase"] == 3
        assert config["output_dir"] == str(out)
    exits = [[r.exit.exit_code for r in _wandb_records(a / f"run-{run_id}.wandb")
              if r.HasField("exit")] for a in attempts]
    assert exits == [[], [0]], "the killed attempt never finished; the rerun finished cleanly"
    assert not resumed["leftover"] and not resumed["leftover_after"], "W&B service left running"


def test_rows_are_tensorboards_scalars_at_its_steps(resumed):
    out, run_id = resumed["out"], resumed["first_id"]
    killed, rerun = (_history(_wandb_records(a / f"run-{run_id}.wandb"))
                     for a in sorted((out / "logs" / "wandb").glob(f"offline-run-*-{run_id}")))
    rows = killed + rerun
    assert step_lines(out) == list(range(1, PHASE_ENDS[-1] + 1))
    board = _tensorboard(out / "logs")
    logged = {(k, row["global_step"]): v for row in rows for k, v in row.items()
              if not k.startswith("_") and k not in OURS}
    assert {k for k, _ in logged} == {k for k, _ in board}, "W&B's names are TensorBoard's"
    assert logged.keys() == board.keys()
    for key, value in board.items():
        assert logged[key] == pytest.approx(value, rel=2 ** -23), key  # TensorBoard: float32
    # A kill loses the rows W&B had not yet written (steps before the checkpoint too), so the
    # resumed attempt logs again everything up to its checkpoint from the run's own logs: its
    # record alone is the whole history. Rows never set W&B's step (`_step` counts rows), so a
    # step logged twice is a second row at its global_step, with the same values.
    resume = [e["step"] for e in events(out) if e["event"] == "resume"]
    assert len(resume) == 1 and resume[0] < KILL_AFTER
    rerun_keys = {(k, row["global_step"]) for row in rerun for k in row
                  if not k.startswith("_") and k not in OURS}
    assert rerun_keys == board.keys(), "the resumed attempt's record is whole by itself"
    steps = [sorted({r["global_step"] for r in part
                   if any(k.endswith("/loss") for k in r)})
             for part in (killed, rerun)]
    assert set(steps[0]) <= set(range(1, KILL_AFTER + 1))
    assert steps[1] == list(range(1, PHASE_ENDS[-1] + 1))
    for part in (killed, rerun):
        assert [r["_step"] for r in part] == list(range(len(part)))
    for s in set(steps[0]) & set(steps[1]):
        a, b = ({k: v for r in part if r["global_step"] == s for k, v in r.items()
                 if k not in OURS and k.endswith(("/loss", "/grad_norm", "/lr"))}
                for part in (killed, rerun))
        assert a == b and a, s  # replayed and rerun steps carry the same values
    evals = {e["step"]: {f"eval/stage{j}_loss": v for j, v in e["stage_losses"].items()}
             for e in events(out) if e["event"] == "eval"}
    assert sorted(evals) == list(PHASE_ENDS)
    for part in (rows, rerun):  # the forgetting matrix's rows, at the phase ends
        assert {r["global_step"]: {k: v for k, v in r.items() if k.startswith("eval/stage")}
                for r in part if "eval/stage1_loss" in r} == evals
        assert {r["global_step"] for r in part if "phase_end" in r} == set(PHASE_ENDS)
        starts = {(r["phase"], r["global_step"]) for r in part if "phase" in r}
        assert {(1, 1), (2, 4), (3, 7)} <= starts


def events(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "logs" / "phase_log.jsonl").read_text().splitlines()]


def _config(**wandb) -> ConfigDict:
    c = get_default_config()
    c.train.wandb.update(wandb)
    return c


@pytest.mark.parametrize(("fields", "named"), [
    ({"mode": "offlin"}, "train.wandb.mode='offlin'"),
    ({"tags": "llama3"}, "train.wandb.tags='llama3'"),
    ({"entity": 3}, "train.wandb.entity=3"),
])
def test_a_bad_field_is_one_line_naming_it(fields, named):
    c = _config(project="p")
    with c.ignore_type():
        c.train.wandb.update(fields)
    with pytest.raises(ConfigError, match="^[^\n]*$") as e:
        validate_config(c, ("train",))
    assert named in str(e.value)


def test_a_project_without_wandb_installed_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails, as uninstalled
    with pytest.raises(ConfigError, match="pip install 'phased-jax\\[wandb\\]'"):
        validate_config(_config(project="p"), ("train",))
    validate_config(_config(project=""), ("train",))  # off: no wandb needed


def test_an_error_finishes_the_run_as_failed(tmp_path, monkeypatch):
    import wandb

    from phased_jax.train import tracking

    for name, value in (("WANDB_MODE", "offline"), ("WANDB_CONFIG_DIR", tmp_path / "config"),
                        ("WANDB_CACHE_DIR", tmp_path / "cache"), ("WANDB_CONSOLE", "off")):
        monkeypatch.setenv(name, str(value))
    c = _config(project="p")
    c.output_dir = str(tmp_path / "run")
    try:
        with pytest.raises(RuntimeError, match="a step failed"), \
                tracking.start(c, c.output_dir) as tracker:
            tracker.log({"phase1-stage1/loss": 2.5}, 1)
            raise RuntimeError("a step failed")
    finally:
        wandb.teardown()  # W&B's service process ends with the run, not with pytest
    assert tracker.run is None
    run_id = (tmp_path / "run" / "logs" / "wandb_run_id").read_text().strip()
    (path,) = (tmp_path / "run" / "logs" / "wandb").glob(f"offline-run-*-{run_id}/*.wandb")
    records = _wandb_records(path)
    assert [r.exit.exit_code for r in records if r.HasField("exit")] == [1]
    assert [(r["phase1-stage1/loss"], r["global_step"]) for r in _history(records)] == [(2.5, 1)]


def test_runs_without_a_project_never_import_wandb(tmp_path):
    code = """
import sys
from phased_jax.config import get_default_config
from phased_jax.config_checks import validate_config
from phased_jax.train import runner, tracking
from phased_jax.train.metrics import MetricsWriter
c = get_default_config()
validate_config(c, ("train",))
tracker = tracking.start(c, sys.argv[1])
w = MetricsWriter(sys.argv[1], flops_per_step=1.0, tokens_per_step=1, peak_flops_total=1.0,
                  total_steps=1, console=False, tracker=tracker)
w.write(1, {"loss": 1.0})
w.close()
with tracker:
    tracker.eval_summary("phase1-stage1", {"stage1_loss": 0.5})
assert tracker.run is None
assert "wandb" not in sys.modules, "wandb imported"
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
