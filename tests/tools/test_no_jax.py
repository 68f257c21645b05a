"""The tools run on a laptop without JAX: what they share with phased_jax must not pull it in."""

from __future__ import annotations

import subprocess
import sys


def test_score_and_judge_import_without_jax() -> None:
    code = ("import sys, phased_tools.score, phased_tools.judge\n"
            "heavy = sorted(m for m in ('jax', 'flax', 'numpy') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
