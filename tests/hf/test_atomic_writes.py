"""Every output appears whole or not at all, `overwrite` included (issue 10, "nothing is lost").

Written beside the target under a temp name, renamed in when complete; an old output is renamed
aside and deleted only after that. Killed attempts' leftovers are recognised by name and cleaned
(or, for an old output renamed aside, restored); nothing else is touched.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import phased_jax.hf as hf
from phased_jax import atomic_dir, io_errors, params_checkpoint
from phased_jax.errors import CheckpointError
from phased_jax.params_checkpoint import load_params, params_complete, save_params


def snapshot(directory) -> dict[str, bytes]:
    """Every file under `directory` (relative path -> bytes)."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def listing(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def tiny(hf_checkpoint):
    directory, _ = hf_checkpoint("llama-gqa")
    return hf.load(directory)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _fake_temp(path, pid: int | None) -> None:
    path.mkdir()
    (path / "junk").write_text("partial")
    if pid is not None:
        (path / atomic_dir.MARKER).write_text(json.dumps({"host": os.uname().nodename, "pid": pid}))


def test_failed_write_keeps_the_old_output_and_no_temp(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_dir.atomic_directory(out, overwrite=True) as t:
        (t / "new.txt").write_text("half")
        raise RuntimeError("boom")
    assert snapshot(out) == {"keep.txt": b"old"}
    assert listing(tmp_path) == ["out"]
    with atomic_dir.atomic_directory(out, overwrite=True) as t:
        (t / "new.txt").write_text("whole")
    assert snapshot(out) == {"new.txt": b"whole"}  # no marker, nothing of the old one
    assert listing(tmp_path) == ["out"]


def test_leftovers_of_killed_writes_are_cleaned_and_nothing_else(tmp_path, tiny):
    model, params = tiny
    out = tmp_path / "out"
    _fake_temp(tmp_path / ".out.tmp-deadbeef", _dead_pid())  # killed after its marker
    _fake_temp(tmp_path / ".out.tmp-0badc0de", None)  # killed before its marker
    _fake_temp(tmp_path / ".out.tmp-cafef00d", os.getppid())  # a live writer: not ours to take
    for name in (".out.tmp-1234567", "out.tmp-deadbeef", ".other.tmp-deadbeef", ".out.tmp-x"):
        _fake_temp(tmp_path / name, _dead_pid())  # not our temp names for this target
    hf.save(out, model, params)
    assert listing(tmp_path) == sorted([".out.tmp-cafef00d", ".out.tmp-1234567", "out.tmp-deadbeef",
                                        ".other.tmp-deadbeef", ".out.tmp-x", "out"])
    assert (tmp_path / "out.tmp-deadbeef" / "junk").read_text() == "partial"
    assert hf.export_complete(out)


def test_old_output_renamed_aside_is_restored_or_removed(tmp_path, tiny):
    model, params = tiny
    out = tmp_path / "out"
    old = tmp_path / ".out.old-abcdef12"  # killed between "old aside" and "new in"
    old.mkdir()
    (old / "keep.txt").write_text("previous output")
    with pytest.raises(CheckpointError, match="already exists"):
        hf.save(out, model, params)  # restored first, so it is not clobbered silently
    assert snapshot(out) == {"keep.txt": b"previous output"}
    assert listing(tmp_path) == ["out"]

    stale = tmp_path / ".out.old-12345678"  # killed after "new in": the old copy is garbage
    stale.mkdir()
    hf.save(out, model, params, overwrite=True)
    assert listing(tmp_path) == ["out"]
    assert hf.export_complete(out)


def test_swap_failure_puts_the_old_output_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError(errno.EIO, "simulated I/O error")
        real_rename(src, dst)

    monkeypatch.setattr(atomic_dir.os, "rename", rename)
    with pytest.raises(OSError, match="simulated"), atomic_dir.atomic_directory(out, overwrite=True) as t:
        (t / "new.txt").write_text("whole")
    assert snapshot(out) == {"keep.txt": b"old"}
    assert listing(tmp_path) == ["out"]


def test_save_params_failure_keeps_old_params(tmp_path, tiny, monkeypatch):
    model, params = tiny
    out = tmp_path / "params"
    save_params(out, model.cfg, params)
    before = snapshot(out)
    real_save = params_checkpoint.ocp.StandardCheckpointer.save

    def failing_save(self, directory, *args, **kwargs):
        real_save(self, directory, *args, **kwargs)
        self.wait_until_finished()
        raise OSError(errno.EIO, "simulated failure after writing")

    monkeypatch.setattr(params_checkpoint.ocp.StandardCheckpointer, "save", failing_save)
    doubled = dict(params)
    doubled["embed"] = params["embed"] * 2
    with pytest.raises(OSError, match="simulated"):
        save_params(out, model.cfg, doubled, overwrite=True)
    assert snapshot(out) == before
    assert listing(tmp_path) == ["params"]
    monkeypatch.undo()
    save_params(out, model.cfg, doubled, overwrite=True)
    _, restored = load_params(out)
    np.testing.assert_array_equal(np.asarray(restored["embed"]), np.asarray(doubled["embed"]))
    assert listing(tmp_path) == ["params"]


def test_save_params_completes_a_partial_target(tmp_path, tiny):
    """What a resumed run does with a phase whose params dir a kill left incomplete."""
    model, params = tiny
    out = tmp_path / "phase1-easy"
    (out / "params.orbax-checkpoint-tmp-1712345678").mkdir(parents=True)  # old-style partial
    (out / "params.orbax-checkpoint-tmp-1712345678" / "x").write_bytes(b"\0" * 10)
    _fake_temp(tmp_path / ".phase1-easy.tmp-00c0ffee", None)  # a killed new-style attempt
    (tmp_path / ".phase1-easy.tmp-00c0ffee" / "params.orbax-checkpoint-tmp").mkdir()
    assert not params_complete(out)
    save_params(out, model.cfg, params, overwrite=True)
    assert params_complete(out)
    assert listing(tmp_path) == ["phase1-easy"]
    assert listing(out) == ["model_config.json", "params"]
    cfg, restored = load_params(out)
    assert cfg == model.cfg
    for a, b in zip(jax_leaves(restored), jax_leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    save_params(out, model.cfg, params, overwrite=True)  # again over a complete one: fine
    assert params_complete(out) and listing(tmp_path) == ["phase1-easy"]


def jax_leaves(tree) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_params_complete_sees_what_is_missing(tmp_path, tiny):
    import shutil

    model, params = tiny
    good = save_params(tmp_path / "good", model.cfg, params)
    assert params_complete(good)
    assert not params_complete(tmp_path / "absent")

    def broken(name, damage):
        d = tmp_path / name
        shutil.copytree(good, d)
        damage(d)
        return d

    assert not params_complete(broken("no_config", lambda d: (d / "model_config.json").unlink()))
    assert not params_complete(broken("torn_config", lambda d: (d / "model_config.json")
                                      .write_text('{"vocab_size": 12')))
    assert not params_complete(broken("no_metadata",
                                      lambda d: (d / "params" / "_METADATA").unlink()))
    assert not params_complete(broken("no_params", lambda d: shutil.rmtree(d / "params")))

    def no_data(d):
        for name in ("manifest.ocdbt", "d"):
            p = d / "params" / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)

    assert not params_complete(broken("no_data", no_data))


def test_export_complete(tmp_path, tiny):
    model, params = tiny
    out = hf.save(tmp_path / "hf", model, params, max_shard_size="20KB")
    assert hf.export_complete(out)
    assert not hf.export_complete(tmp_path / "absent")
    last = sorted(out.glob("model-*.safetensors"))[-1]
    data = last.read_bytes()
    last.write_bytes(data[:-4])
    assert not hf.export_complete(out)
    last.write_bytes(data)
    (out / "config.json").unlink()
    assert not hf.export_complete(out)


# --- disk full, simulated (the real thing on a small tmpfs is in test_disk_full.py) ---------

TENSORSTORE_ENOSPC = ("RESOURCE_EXHAUSTED: Error writing \"embed/0\" in OCDBT database at local "
                      "file \"/x/params/\": Failed to write 1119111 bytes to file 11: No space "
                      "left on device [os_error_code='28']")


def test_is_disk_full_reads_the_whole_chain():
    assert io_errors.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert io_errors.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert io_errors.is_disk_full(ValueError(TENSORSTORE_ENOSPC))  # how Orbax/tensorstore raise it
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("checkpoint save failed") from e
    except RuntimeError as wrapped:
        assert io_errors.is_disk_full(wrapped)
    try:
        try:
            raise OSError(errno.ENOSPC, "full")
        except OSError:
            raise KeyError("while handling it") from None
    except KeyError as hidden:  # `from None` hides it from tracebacks, not from __context__
        assert io_errors.is_disk_full(hidden)
    group = ExceptionGroup("writers", [ValueError("other"), ValueError(TENSORSTORE_ENOSPC)])
    assert io_errors.is_disk_full(group)
    for other in (OSError(errno.EIO, "Input/output error"), ValueError("bad shape"),
                  PermissionError(errno.EACCES, "Permission denied"), RuntimeError("28 items")):
        assert not io_errors.is_disk_full(other), other


def test_disk_full_error_is_one_line_with_path_and_sizes(tmp_path):
    err = io_errors.disk_full_error(ValueError(TENSORSTORE_ENOSPC), tmp_path / "out", 123_456_789,
                                 replacing=True)
    assert isinstance(err, CheckpointError)
    msg = str(err)
    assert "\n" not in msg
    assert msg.startswith(f"{tmp_path / 'out'}: no space left on device")
    assert "needs about 123.5 MB" in msg and "is free there" in msg and "old output" in msg
    assert io_errors.disk_full_error(ValueError("bad shape"), tmp_path) is None
    assert io_errors.human_bytes(512) == "512 B" and io_errors.human_bytes(2.5e12) == "2.5 TB"


def test_hf_save_disk_full_mid_write(tmp_path, tiny, monkeypatch):
    model, params = tiny
    out = hf.save(tmp_path / "hf", model, params)
    before = snapshot(out)
    from phased_jax.hf import safetensors_shards

    real_header = safetensors_shards._header

    def header_then_full(specs):
        if specs[0].name != "model.embed_tokens.weight":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_header(specs)

    monkeypatch.setattr(safetensors_shards, "_header", header_then_full)  # the 2nd shard hits a full disk
    with pytest.raises(CheckpointError) as info:
        hf.save(out, model, params, max_shard_size="20KB", overwrite=True)
    msg = str(info.value)
    assert "\n" not in msg and "no space left on device" in msg and str(out) in msg
    assert "needs about" in msg
    assert isinstance(info.value.__cause__, OSError)
    assert snapshot(out) == before
    assert listing(tmp_path) == ["hf"]


def test_save_params_disk_full_from_orbax(tmp_path, tiny, monkeypatch):
    model, params = tiny

    def full(self, directory, *args, **kwargs):
        directory.mkdir()
        (directory / "partial").write_bytes(b"\0" * 100)
        raise ValueError(TENSORSTORE_ENOSPC)

    monkeypatch.setattr(params_checkpoint.ocp.StandardCheckpointer, "save", full)
    with pytest.raises(CheckpointError, match="no space left on device") as info:
        save_params(tmp_path / "params", model.cfg, params)
    assert "\n" not in str(info.value)
    assert f"needs about {io_errors.human_bytes(params_checkpoint.params_nbytes(params))}" in str(info.value)
    assert listing(tmp_path) == []
