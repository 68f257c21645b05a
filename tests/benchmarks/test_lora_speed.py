"""benchmarks/lora_speed.py at its --quick size: all four sides step, the two frameworks train the
same number of parameters in each mode, and the table's ratios are its own tokens/s'."""

import importlib.util
import sys

import pytest

from tests.conftest import REPO

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("lora_speed", REPO / "benchmarks" / "lora_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()


@pytest.mark.slow  # two compiles and four models: ~40 s of CPU
def test_quick_run_prints_the_table_with_its_ratios(capsys):
    assert bench.main(["--quick", "--repeats", "1", "--rank", "4"]) == 0
    out = capsys.readouterr().out
    assert bench.cpu_model() in out.splitlines()[0]
    lines = out.splitlines()
    head = lines.index("| " + " | ".join(bench.COLUMNS) + " |")
    rows = {}
    for line in lines[head + 2:head + 2 + len(bench.SIDES)]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    assert list(rows) == list(bench.SIDES)
    tok_s = {s: float(r[1]) for s, r in rows.items()}
    trainable = {s: int(r[3].replace(",", "")) for s, r in rows.items()}
    assert all(t > 0 for t in tok_s.values())
    q = bench.QUICK
    d, f, kv = q["hidden"], q["intermediate"], q["hidden"] // q["heads"] * q["kv_heads"]
    # r * (in + out) per target: q, k, v, o, gate, up, down
    lora_per_layer = 4 * ((d + d) + 2 * (d + kv) + (d + d) + 2 * (d + f) + (f + d))
    assert trainable["jax LoRA"] == trainable["torch+peft LoRA"] == q["layers"] * lora_per_layer
    assert trainable["jax full"] == trainable["torch full"] > trainable["jax LoRA"]
    # ratios printed to 2 decimals of tokens/s printed to +-0.5
    def near(cell, a, b):
        lo, hi = (tok_s[a] - 0.5) / (tok_s[b] + 0.5), (tok_s[a] + 0.5) / max(tok_s[b] - 0.5, 1e-9)
        return lo - 0.005 <= float(cell.rstrip("x")) <= hi + 0.005
    assert near(rows["jax LoRA"][4], "jax LoRA", "jax full")
    assert near(rows["torch+peft LoRA"][4], "torch+peft LoRA", "torch full")
    assert near(rows["jax full"][5], "jax full", "torch full")
    assert near(rows["jax LoRA"][5], "jax LoRA", "torch+peft LoRA")
    assert rows["jax full"][4] == rows["torch full"][5] == "-"
