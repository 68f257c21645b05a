"""Soak the local pod: N consecutive `phased-jax train --local-pod 2` runs of the tests' tiny
3-phase experiment with `train.epochs_per_phase=6` (162 steps), the shape that hung 3 times in 4
before the fix (issue 21, "Why" 5). Every run must finish, and every final export
(`<output_dir>/hf/*.safetensors`) must be byte-identical: the same data, seed and pod must give
the same bytes, so a run that diverged (or a collective that mixed up its messages) shows.

    .venv/bin/python benchmarks/local_pod_soak.py [--runs 20] [--watchdog-s 120] [--keep DIR]

Each run has the launcher's watchdog (a hang ends as exit code 124 with every worker's stacks
in `<output_dir>/logs/local_pod_stacks.txt`) and a wall-clock backstop. Prints one row per run
(run, seconds, steps, export hash) and exits 1 unless all finished with identical exports.
CPU-heavy (about 1.5 min a run on 2 cores); not part of `make test`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.runner.runs import write_config  # noqa: E402  (the tests' tiny experiment config)

STEPS = 162  # phases of 90, 48 and 24 steps: 15, 8 and 4 at batch 8, six epochs each


def tiny_experiment(root: Path) -> dict:
    """The tests' tiny experiment (tests/runner/conftest.py): 200 graded records, a tokenizer."""
    from phased_jax.data.toy_tokenizer import build_tokenizer
    from phased_jax.demo.tasks import build_dataset, texts_for_tokenizer

    info = build_dataset(root / "data", n_train=200, n_test=12, seed=1)
    records = [json.loads(line) for line in Path(info["train"]).read_text().splitlines()]
    tok = build_tokenizer(texts_for_tokenizer(records), 320, root / "tok")
    return {"data": str(info["train"]), "tok": str(root / "tok"), "vocab": len(tok)}


def export_hash(hf_dir: Path) -> str:
    """SHA-256 over the export's safetensors files (names and bytes, in name order)."""
    digest = hashlib.sha256()
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        return "-"
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def last_step(out: Path) -> int:
    log = out / "logs" / "phase_log.jsonl"
    steps = [json.loads(line).get("step", 0) for line in log.read_text().splitlines()
             if '"event": "step"' in line] if log.is_file() else []
    return max(steps, default=0)


def one_run(config: Path, out: Path, args: argparse.Namespace) -> tuple[int, float, str]:
    """(exit code, seconds, last output line) of one pod run, as a user types it."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", "phased_jax.cli", "train", "--config", str(config),
               f"--config.train.epochs_per_phase={args.epochs}",
               "--local-pod", str(args.processes), "--local-devices", str(args.local_devices),
               "--watchdog-s", str(args.watchdog_s)]
    started = time.monotonic()
    try:
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=args.timeout_s)
        code, text = proc.returncode, (proc.stdout + proc.stderr).strip()
    except subprocess.TimeoutExpired as e:  # the watchdog failed to end it: say so
        code, text = -1, f"no exit within {args.timeout_s} s: {e}"
    (out.parent / f"{out.name}.log").write_text(text)
    return code, time.monotonic() - started, (text.splitlines() or [""])[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--local-devices", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=6, help="train.epochs_per_phase")
    parser.add_argument("--watchdog-s", type=float, default=120.0)
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="backstop per run")
    parser.add_argument("--keep", type=Path, help="work directory to keep (default: a temp one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="phased-soak-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        exp = tiny_experiment(root / "experiment")
        print(f"{'run':>4} {'seconds':>8} {'steps':>6}  export hash (sha256 of hf/*.safetensors)",
              flush=True)
        rows, started = [], time.monotonic()
        for i in range(1, args.runs + 1):
            out = root / f"run{i:02d}"
            code, seconds, last = one_run(write_config(exp, out), out, args)
            digest, steps = export_hash(out / "hf"), last_step(out)
            rows.append((code, steps, digest))
            note = "" if code == 0 else f"  FAILED (exit {code}): {last}"
            print(f"{i:>4} {seconds:>8.1f} {steps:>6}  {digest[:16]}{note}", flush=True)
        total = time.monotonic() - started
        finished = sum(code == 0 and steps == STEPS for code, steps, _ in rows)
        hashes = {digest for code, _, digest in rows if code == 0}
        identical = finished == len(rows) and len(hashes) == 1
        print(f"{finished}/{len(rows)} runs finished all {STEPS} steps; exports "
              f"{'identical' if identical else f'NOT identical ({len(hashes)} distinct)'}; "
              f"{total / 60:.1f} min in all", flush=True)
        return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
