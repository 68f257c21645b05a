"""Peak host memory of HF conversion, as a multiple of the checkpoint's size (goal: <= 1.5x).

Writes a random float32 Llama-shaped checkpoint (~245M params, ~1 GB, two safetensors shards;
no torch needed), then measures in a fresh subprocess per direction:

  load:  HF -> our params in memory          (phased_jax.hf.load)
  save:  our params in memory -> HF          (phased_jax.hf.save; the params were loaded first,
         and the peak is reset before saving so it counts the save alone, params included)

Peak RSS is the child's ru_maxrss; "over baseline" subtracts the RSS after imports and JAX start.
One copy of the params is 1.0x by definition, so the interesting part is what lies above it.

    .venv/bin/python benchmarks/convert_memory.py [--layers 14] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (Linux >= 4.0)
        f.write("5")


def model_config(layers: int):
    from phased_jax.model.config import ModelConfig

    return ModelConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                       num_layers=layers, num_heads=16, num_kv_heads=16, architecture="llama")


def write_random_checkpoint(directory: Path, layers: int) -> int:
    """A random HF checkpoint written tensor by tensor; returns its tensor bytes."""
    from phased_jax.hf import mapping
    from phased_jax.hf.hf_config import hf_config_from
    from phased_jax.hf.safetensors_shards import TensorSpec, write_shards

    cfg = model_config(layers)
    specs = [TensorSpec(n, s, np.dtype(np.float32)) for n, s in mapping.hf_tensor_specs(cfg)]
    rng = np.random.default_rng(0)
    tensors = ((s.name, rng.standard_normal(s.shape, np.float32) * 0.02) for s in specs)
    write_shards(directory, specs, tensors, max_shard_bytes=600 * 10**6)
    (directory / "config.json").write_text(json.dumps(hf_config_from(cfg)))
    return sum(s.nbytes for s in specs)


def child(direction: str, src: Path, dst: Path) -> None:
    import jax

    import phased_jax.hf as hf

    jax.devices()
    jax.device_put(np.zeros(4)).block_until_ready()
    base = _rss_mib()
    t = time.perf_counter()
    model, params = hf.load(src)
    jax.block_until_ready(params)
    result = {"direction": direction, "baseline_mib": base}
    if direction == "save":
        result["before_save_mib"] = _rss_mib()
        _reset_peak()
        t = time.perf_counter()
        hf.save(dst, model, params, max_shard_size="600MB")
    result.update(peak_mib=_peak_mib(), seconds=time.perf_counter() - t)
    print(json.dumps(result))


def run_child(direction: str, src: Path, dst: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", direction, str(src), str(dst)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def same_tensors(a: Path, b: Path) -> bool:
    from phased_jax.hf.tensor_files import open_checkpoint

    ra, rb = open_checkpoint(a), open_checkpoint(b)
    return ra.shapes == rb.shapes and all(np.array_equal(ra.get(n), rb.get(n)) for n in ra.shapes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=14)
    p.add_argument("--keep", type=Path, help="work in this directory and keep the files")
    p.add_argument("--child", nargs=3, metavar=("DIRECTION", "SRC", "DST"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return

    with tempfile.TemporaryDirectory(dir=args.keep) as tmp:
        work = Path(tmp)
        src = work / "hf_in"
        src.mkdir()
        size = write_random_checkpoint(src, args.layers)
        size_mib = size / 2**20
        rows = [run_child("load", src, work / "unused"), run_child("save", src, work / "hf_out")]
        print(f"checkpoint: {size_mib:.0f} MiB float32 ({size // 4 / 1e6:.0f}M params), "
              f"{len(list(src.glob('*.safetensors')))} shards")
        print(f"{'direction':<22} {'peak RSS MiB':>12} {'x ckpt':>7} {'over base MiB':>14} "
              f"{'x ckpt':>7} {'seconds':>8}")
        for r in rows:
            name = "HF -> ours (load)" if r["direction"] == "load" else "ours -> HF (save)"
            over = r["peak_mib"] - r["baseline_mib"]
            print(f"{name:<22} {r['peak_mib']:>12.0f} {r['peak_mib'] / size_mib:>7.2f} "
                  f"{over:>14.0f} {over / size_mib:>7.2f} {r['seconds']:>8.1f}")
        save = rows[1]
        print(f"(save: baseline {save['baseline_mib']:.0f} MiB, params loaded "
              f"{save['before_save_mib']:.0f} MiB before saving)")
        print("round trip bit-exact:", same_tensors(src, work / "hf_out"))


if __name__ == "__main__":
    main()
