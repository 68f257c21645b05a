"""`phased-jax convert --overwrite` onto a disk too small for the new output, both directions.

A real full disk (a 2 MB tmpfs, so root is needed): one clear error line, exit 1, the old output
byte-for-byte intact and no temp left; with space freed the same command succeeds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import phased_jax.hf as hf
from phased_jax.params_checkpoint import load_params, params_complete, save_params

from .helpers import assert_same_tensors, read_safetensors_dir
from .test_atomic_writes import listing, snapshot

REPO = Path(__file__).resolve().parents[2]
SPARE = 16 * 1024  # what the filler leaves free: far less than either output (~95 KB)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs mounted at tmp_path/disk, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a small tmpfs, and mounting one needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (container without CAP_SYS_ADMIN?): "
                    f"{proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Leave only SPARE bytes free on `disk`."""
    st = os.statvfs(disk)
    filler = disk / "filler"
    filler.write_bytes(b"\xff" * (st.f_bavail * st.f_frsize - SPARE))
    return filler


def convert(*args: str) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process, so every line it prints (logs included) is seen."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "phased_jax.cli", "convert", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def assert_one_clear_line(proc: subprocess.CompletedProcess, out: Path) -> None:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # no traceback, no logged echoes
    line = lines[0]
    assert line.startswith(f"phased-jax convert: error: {out}: no space left on device"), line
    assert "needs about" in line and "free there" in line and "old output is kept" in line


def test_convert_to_orbax_on_a_full_disk(small_disk, hf_checkpoint):
    llama, _ = hf_checkpoint("llama-gqa")
    mistral, _ = hf_checkpoint("mistral-window")
    out = small_disk / "out"
    model, params = hf.load(llama)
    save_params(out, model.cfg, params)  # the old output: a different model
    before = snapshot(out)
    filler = fill(small_disk)

    proc = convert(str(mistral), str(out), "--overwrite")
    assert_one_clear_line(proc, out)
    assert snapshot(out) == before
    assert listing(small_disk) == ["filler", "out"]

    filler.unlink()
    proc = convert(str(mistral), str(out), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert listing(small_disk) == ["out"] and params_complete(out)
    cfg, restored = load_params(out)
    want_model, want = hf.load(mistral)
    assert cfg == want_model.cfg
    np.testing.assert_array_equal(np.asarray(restored["lm_head"]), np.asarray(want["lm_head"]))


def test_convert_to_hf_on_a_full_disk(small_disk, hf_checkpoint, tmp_path):
    llama, _ = hf_checkpoint("llama-gqa")
    mistral, _ = hf_checkpoint("mistral-window")
    model, params = hf.load(mistral)
    src = save_params(tmp_path / "mistral-orbax", model.cfg, params)  # on the big disk
    out = small_disk / "out"
    old_model, old_params = hf.load(llama)
    hf.save(out, old_model, old_params)  # the old output: a different model
    before = snapshot(out)
    filler = fill(small_disk)

    proc = convert(str(src), str(out), "--overwrite")
    assert_one_clear_line(proc, out)
    assert snapshot(out) == before
    assert listing(small_disk) == ["filler", "out"]

    filler.unlink()
    proc = convert(str(src), str(out), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert listing(small_disk) == ["out"] and hf.export_complete(out)
    assert_same_tensors(read_safetensors_dir(mistral), read_safetensors_dir(out))
