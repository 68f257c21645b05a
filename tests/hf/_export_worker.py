"""One process of a 2-process export, started by test_multihost_export through launch_local_pod.

Builds the sharded params of tests/hf/export_model.py, measures this process's peak RSS growth
while `hf.save` streams them out, then (as a control showing the measurement can see a whole
model) while gathering them all the old way, checks a refused save fails on every process, and
saves Orbax params twice (the second over the first). Exports to OUT/export/hf/ and
OUT/export/params/; writes what it saw to OUT/result-<process>.json.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo, for tests.hf.*

from phased_jax import distributed  # noqa: E402


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class PeakRSS:
    """Peak resident memory over a block: the kernel's VmHWM after resetting it (clear_refs 5),
    and a 2 ms sampler in case the reset is not allowed."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.start = _status("VmRSS")
        self.sampled = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.sampled = max(self.sampled, _status("VmRSS"))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        peak = max(self.sampled, _status("VmHWM")) if self.hwm_reset else self.sampled
        self.growth = peak - self.start


def main(out: Path) -> None:
    distributed.initialize()
    import jax
    from jax.experimental import multihost_utils

    import phased_jax.hf as hf
    from phased_jax.errors import CheckpointError
    from phased_jax.hf import to_hf
    from tests.hf.export_model import CFG, make_params, model_bytes

    opened = []  # every output directory this process starts: only process 0 may
    start_output = to_hf.atomic_directory
    to_hf.atomic_directory = lambda *a, **k: opened.append(a[0]) or start_output(*a, **k)

    mesh = jax.make_mesh((jax.device_count(),), ("fsdp",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    params = jax.block_until_ready(make_params(mesh))
    local = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards)

    t0 = time.time()
    with PeakRSS() as export:
        hf.save(out / "export" / "hf", CFG, params, max_shard_size="40MB")
    seconds = time.time() - t0

    with PeakRSS() as control:  # what the runner did before: every process gathers everything
        gathered = jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True),
                                params)
    del gathered

    try:  # process 0 refuses (the output exists); every process must raise, none may hang
        hf.save(out / "export" / "hf", CFG, params)
        refused = ""
    except CheckpointError as e:
        refused = str(e)

    from phased_jax.params_checkpoint import params_complete, save_params

    for _ in range(2):  # Orbax params too: a fresh directory, then overwritten in place
        save_params(out / "export" / "params", CFG, params, overwrite=True)
    complete = params_complete(out / "export" / "params")

    result = {"process": jax.process_index(), "processes": jax.process_count(),
              "model_bytes": model_bytes(), "local_bytes": local,
              "export_growth": export.growth, "control_growth": control.growth,
              "hwm_reset": export.hwm_reset, "seconds": seconds, "refused": refused,
              "opened": len(opened), "params_complete": complete}
    (out / f"result-{jax.process_index()}.json").write_text(json.dumps(result))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
