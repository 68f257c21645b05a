"""`hf.save` on a 2-process run: one layer slice gathered at a time, only process 0 writes.

The old way (every process all-gathers every param, then process 0 writes) needs the whole model
on every host; a 70B export would need ~280 GB per host. Here each process's peak RSS growth
during the export must stay well below the model's size, while the same measurement sees the
whole model when the old gather is done, and the files equal a 1-process export bit for bit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from phased_jax import distributed

from .helpers import assert_same_tensors, read_safetensors_dir

WORKER = Path(__file__).with_name("_export_worker.py")


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_two_process_export_streams_and_matches_one_process(tmp_path, capsys, monkeypatch):
    import phased_jax.hf as hf

    from .export_model import CFG, make_params, model_bytes

    # glibc keeps freed blocks below its dynamic mmap threshold (up to 32 MB) in per-thread
    # arenas, so at this model's scale RSS would measure the allocator's hoard, not live memory.
    # A 70B export's slices are far above 32 MB and go back on free; a fixed 1 MB threshold
    # gives this small model the same behaviour. One device per process: on CPU a device's
    # memory is host memory, so a replicated slice would count once per local device.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    rc = distributed.launch_local_pod(2, [sys.executable, str(WORKER), str(tmp_path)],
                                      devices_per_process=1)
    log = capsys.readouterr().out
    assert rc == 0, log[-5000:]
    results = [json.loads((tmp_path / f"result-{i}.json").read_text()) for i in range(2)]

    size = model_bytes()
    assert size > 150e6  # big enough that a gathered copy stands out of the noise
    for r in results:
        assert r["processes"] == 2
        assert r["local_bytes"] < 0.6 * size, r  # each process holds about half
        assert r["control_growth"] >= 0.9 * size, r  # the measurement sees a whole model
        assert r["export_growth"] < 0.5 * size, r  # streaming: well below one model
    assert [r["opened"] for r in results] == [2, 0]  # only process 0 ever writes
    assert "already exists" in results[0]["refused"]
    assert "process 0 could not write" in results[1]["refused"]
    assert all(r["params_complete"] for r in results)
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["hf", "params"]  # no temps

    reference = hf.save(tmp_path / "single" / "hf", CFG, make_params(None),
                        max_shard_size="40MB")
    pod, one = _files(tmp_path / "export" / "hf"), _files(reference)
    assert len([n for n in pod if n.endswith(".safetensors")]) > 1
    assert sorted(pod) == sorted(one)
    for name in one:
        assert pod[name] == one[name], name

    from phased_jax.params_checkpoint import load_params

    cfg, restored = load_params(tmp_path / "export" / "params")
    assert cfg == CFG
    assert_same_tensors(dict(hf.to_hf.hf_tensors(cfg, restored)), read_safetensors_dir(reference))
