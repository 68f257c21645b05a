"""benchmarks/gpu_train_step.py on CPU at its tiny shape: both sides run, the table is whole, and
the two frameworks' first-step losses on the shared initial weights agree."""

import importlib.util
import math
import sys

import numpy as np
import pytest

from tests.conftest import REPO

pytest.importorskip("torch")
pytest.importorskip("transformers")


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("gpu_train_step", REPO / "benchmarks" / "gpu_train_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()


def test_tiny_run_prints_the_table_and_both_sides_start_from_the_same_loss(capsys, tmp_path):
    # Each side in its own process, as on a GPU: the parent only reads their results.
    assert bench.main(["--tiny", "--steps", "2", "--warmup", "1", "--dtype", "float32",
                       "--isolate", "yes", "--workdir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:1] == ["side"])
    assert lines[head].split() == list(bench.COLUMNS)
    rows = {line.split()[0]: line.split() for line in lines[head + 1:head + 4]}
    assert list(rows) == ["jax", "torch", "jax/torch"]
    col = {name: i for i, name in enumerate(bench.COLUMNS)}
    for side in ("jax", "torch"):
        # device names may hold spaces ("cpu (xla)"): read the numeric columns from the right
        numbers = rows[side][-(len(bench.COLUMNS) - col["layers"]):]
        layers, batch, seq = (int(x) for x in numbers[:3])
        assert (layers, batch, seq) == (bench.TINY["num_layers"], bench.TINY["batch"], bench.TINY["seq"])
        step_s, tok_s = float(numbers[3]), float(numbers[4])
        # step_s is printed to 4 decimals (+-5e-5 s) and tok/s to +-0.5: bound the tokens/s
        # that the printed step time allows, not a fixed relative error
        lo, hi = batch * seq / (step_s + 5e-5), batch * seq / max(step_s - 5e-5, 1e-9)
        assert step_s > 0 and lo - 0.5 <= tok_s <= hi + 0.5
        assert numbers[5].endswith("%")
    ratio = float(rows["jax/torch"][1].rstrip("x"))
    jax_tok_s, torch_tok_s = float(rows["jax"][-5]), float(rows["torch"][-5])  # printed to +-0.5
    assert (jax_tok_s - 0.5) / (torch_tok_s + 0.5) - 0.005 <= ratio <= (jax_tok_s + 0.5) / (torch_tok_s - 0.5) + 0.005

    jax_loss, torch_loss = float(rows["jax"][-2]), float(rows["torch"][-2])
    # float32 forwards differ only in summation order: a relative error of about sqrt(K) eps per
    # contraction of length K, compounding over the layers and the head.
    t = bench.TINY
    tol = jax_loss * (t["num_layers"] + 1) * math.sqrt(t["intermediate_size"]) * np.finfo(np.float32).eps
    assert abs(jax_loss - torch_loss) <= tol
    # ... and the check can fail: the wide init puts the loss far from the ln(vocab) of any
    # small-init model, so weights mapped wrongly would not land within tol of it.
    assert abs(jax_loss - math.log(t["vocab_size"])) > 100 * tol


def test_default_layers_fill_the_card_and_no_more():
    layers = bench.fit_layers(batch=4, seq=2048)
    assert 8 <= layers < 32  # 7B width on 80 GB: a 32-layer 7B needs ~110 GB of f32 state alone
    assert bench.fit_layers(batch=1, seq=2048) > layers  # fewer activations, more layers
    assert bench.fit_layers(batch=4, seq=2048, card_gib=141) > layers  # an H200


def test_a_kernel_this_platform_lacks_is_one_line(capsys):
    assert bench.main(["--tiny", "--steps", "1", "--attention-impl", "cudnn", "--isolate", "no"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "attention_impl='cudnn'" in err[0] and "needs a GPU" in err[0]
