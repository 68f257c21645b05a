"""Restore never destroys: config mismatch -> error, I/O error -> retry, only corruption moves."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import jax
import numpy as np
import pytest

from phased_jax import checkpoint
from phased_jax.checkpoint import RunCheckpoints
from phased_jax.errors import CheckpointError, ConfigError
from phased_jax.train import build_trainer
from tests.train.helpers import tiny_config

STEPS = (2, 4)
# A failed restore leaves Orbax's read coroutines unfinished; their echoes are not the test's.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _manager(directory: Path, retries: int = 2, on_unreadable: str = "stop") -> RunCheckpoints:
    return RunCheckpoints(str(directory), keep=3, async_save=False, restore_retries=retries,
                          retry_backoff_s=0.0, on_unreadable=on_unreadable)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A directory with checkpoints at steps 2 and 4 of a tiny run, and the state saved at 4."""
    config = tiny_config()
    trainer = build_trainer(config)
    directory = tmp_path_factory.mktemp("ckpts")
    ckpts = _manager(directory)
    state = trainer.init_state(10)
    for step in STEPS:
        state = state.replace(step=state.step + 1)
        ckpts.save(step, state, {"config": config.to_json(), "step": step})
    ckpts.close()
    return config, directory, jax.device_get(state.params)


@pytest.fixture
def run_dir(saved, tmp_path):
    import shutil

    target = tmp_path / "ckpts"
    shutil.copytree(saved[1], target)
    return target


def _snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _restore(config, directory: Path, retries: int = 2, on_unreadable: str = "stop"):
    return _manager(directory, retries, on_unreadable).restore_latest(
        build_trainer(config).abstract_state(), config.to_json())


@pytest.mark.parametrize("field, value", [("model.num_layers", 3), ("train.clip_norm", 0.0),
                                          ("model.hidden_size", 64)])
def test_changed_config_is_a_config_error_naming_the_field(saved, run_dir, field, value):
    before = _snapshot(run_dir)
    config = tiny_config()
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=rf"{field}: .* -> {value}") as e:
        _restore(config, run_dir)
    assert "nothing was moved" in str(e.value) and "\n" not in str(e.value)
    assert _snapshot(run_dir) == before, "no checkpoint file touched"


def test_storage_blip_is_retried_and_moves_nothing(saved, run_dir, monkeypatch):
    before = _snapshot(run_dir)
    metadata = run_dir / "4" / "state" / "_METADATA"
    hidden = metadata.with_name("_METADATA.away")
    metadata.rename(hidden)
    waits = []

    def storage_comes_back(seconds):
        waits.append(seconds)
        hidden.rename(metadata)

    monkeypatch.setattr(checkpoint, "_sleep", storage_comes_back)
    state, meta = _restore(saved[0], run_dir)
    assert meta["step"] == 4 and len(waits) == 1
    np.testing.assert_array_equal(jax.device_get(state.params["embed"]), saved[2]["embed"])
    assert _snapshot(run_dir) == before


def test_every_checkpoint_unreadable_for_a_moment(saved, run_dir, monkeypatch):
    """An outage over the whole directory: retried, then the newest one restores."""
    before = _snapshot(run_dir)
    real, calls = checkpoint._read_state, []

    def flaky(path, abstract_state):
        calls.append(path.name)
        if len(calls) <= 2:
            raise OSError(errno.EIO, "Input/output error")
        return real(path, abstract_state)

    monkeypatch.setattr(checkpoint, "_read_state", flaky)
    _, meta = _restore(saved[0], run_dir)
    assert meta["step"] == 4 and calls == ["4", "4", "4"]
    assert _snapshot(run_dir) == before


def test_persistent_io_error_stops_and_moves_nothing(saved, run_dir, monkeypatch):
    before = _snapshot(run_dir)

    def broken(path, abstract_state):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(checkpoint, "_read_state", broken)
    with pytest.raises(CheckpointError, match="after 3 tries.*nothing was moved"):
        _restore(saved[0], run_dir)
    assert _snapshot(run_dir) == before


def test_corrupt_checkpoint_is_set_aside_under_a_fresh_name(saved, run_dir, capsys):
    earlier = run_dir / "4.corrupt"
    earlier.mkdir()
    (earlier / "note").write_text("an earlier set-aside copy")
    data = max((p for p in (run_dir / "4" / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    _, meta = _restore(saved[0], run_dir)
    assert meta["step"] == 2, "falls back to the one before"
    assert (earlier / "note").read_text() == "an earlier set-aside copy", "never replaced"
    assert (run_dir / "4.corrupt.1" / "state").is_dir()
    assert not (run_dir / "4").exists()
    assert "is corrupt" in capsys.readouterr().out


def test_missing_metadata_after_retries_is_corrupt(saved, run_dir):
    (run_dir / "4" / "state" / "_METADATA").unlink()
    _, meta = _restore(saved[0], run_dir)
    assert meta["step"] == 2
    assert (run_dir / "4.corrupt").is_dir()


def _mount_down(directory: Path) -> None:
    """What a storage mount gone for longer than the retries looks like: every step's files
    "missing" (here: each step's `_METADATA` really gone)."""
    for step in STEPS:
        (directory / str(step) / "state" / "_METADATA").unlink()


def test_no_checkpoint_readable_is_the_storage_one_line_nothing_moved(saved, run_dir):
    _mount_down(run_dir)
    before = _snapshot(run_dir)
    with pytest.raises(CheckpointError) as raised:
        _restore(saved[0], run_dir)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"none of the 2 checkpoints in {run_dir} could be read "
                              "(checkpoint 4: state/_METADATA is missing)")
    assert "this looks like the storage, not the checkpoints: nothing was moved" in message
    assert "checkpoint.on_unreadable=restart" in message
    assert _snapshot(run_dir) == before
    assert sorted(p.name for p in run_dir.iterdir()) == ["2", "4"]


def test_on_unreadable_restart_sets_them_aside_and_says_so(saved, run_dir, capsys):
    _mount_down(run_dir)
    assert _restore(saved[0], run_dir, on_unreadable="restart") is None
    assert sorted(p.name for p in run_dir.iterdir()) == ["2.corrupt", "4.corrupt"]
    out = capsys.readouterr().out
    assert "none of the 2 checkpoints could be read; all set aside, starting over from step 0" \
        in out


def test_a_single_unreadable_checkpoint_is_set_aside(saved, run_dir, capsys):
    """One checkpoint, proven incomplete: set aside whole; the run starts over (as before)."""
    import shutil

    shutil.rmtree(run_dir / "4")
    (run_dir / "2" / "state" / "_METADATA").unlink()
    assert _restore(saved[0], run_dir) is None
    assert sorted(p.name for p in run_dir.iterdir()) == ["2.corrupt"]
    assert "starting over from step 0" in capsys.readouterr().out


def test_param_dtype_change_is_a_cast_reported_on_one_line(saved, run_dir, capsys):
    config = tiny_config()
    config.model.param_dtype = "bfloat16"
    state, _ = _restore(config, run_dir)
    assert state.params["embed"].dtype == np.dtype("bfloat16")
    notes = [line for line in capsys.readouterr().out.splitlines() if "cast" in line]
    assert len(notes) == 1 and "float32 -> bfloat16" in notes[0]
