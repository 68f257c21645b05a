"""`phased-jax compile`: accelerator names, TPU topology devices, and real TPU compiles on CPU.

The compiles run libtpu's TPU compiler (the `tpu` extra, part of the test extra) for slices
this machine does not have; they take tens of seconds each, so only two configs compile.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import pytest

from phased_jax.accelerators import parse_tpu, tpu_devices
from phased_jax.cli import main as cli_main
from phased_jax.config import get_default_config, model_section
from phased_jax.errors import ConfigError, UsageError
from phased_jax.sharding import make_mesh
from phased_jax.train.compile import GiB, replicated_dims
from phased_jax.train.trainer import build_trainer

CONFIG = "configs/llama2_7b_phased.py"
# Two layers of Llama-2 7B's width: the real kernels and shardings, a short compile.
SMALL_7B = ["--config.model.num_layers=2", "--config.train.global_batch=8",
            "--config.data.max_length=512", "--steps=train"]


@pytest.mark.parametrize("name, generation, chips, topology", [
    ("v5p-8", "v5p", 4, (2, 2, 1)),
    ("v5p-16", "v5p", 8, (2, 2, 2)),
    ("v5p-128", "v5p", 64, (4, 4, 4)),
    ("v4-32", "v4", 16, (2, 2, 4)),
    ("v5litepod-16", "v5e", 16, (4, 4)),
    ("v5e-4", "v5e", 4, (2, 2)),
    ("v6e-8", "v6e", 8, (2, 4)),
    ("v6e-256", "v6e", 256, (16, 16)),
    ("v5p:4x4x12", "v5p", 192, (4, 4, 12)),
])
def test_accelerator_types_name_cloud_tpu_slices(name, generation, chips, topology):
    tpu = parse_tpu(name)
    assert (tpu.generation, tpu.chips, tpu.topology) == (generation, chips, topology)


@pytest.mark.parametrize("name, says", [
    ("v5p-12", "power-of-two"), ("v5p-7", "TensorCores"), ("v3-8", "accelerator type"),
    ("v5e:2x2x2", "2 dimensions"), ("h100", "accelerator type"),
])
def test_bad_accelerator_types_say_what_to_give(name, says):
    with pytest.raises(UsageError, match=says):
        parse_tpu(name)


def test_topology_devices_are_chips_and_slices():
    v5p = tpu_devices(parse_tpu("v5p-16"))
    assert len(v5p) == 8 and v5p[0].platform == "tpu" and v5p[0].device_kind == "TPU v5"
    assert len(tpu_devices(parse_tpu("v4-8"))) == 4  # megacore: one device a chip
    two = tpu_devices(parse_tpu("v5e-4"), num_slices=2)
    assert len(two) == 8 and {d.slice_index for d in two} == {0, 1}


def _table(out: str) -> dict[str, list[float]]:
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] in ("arguments", "outputs", "temporaries", "peak"):
            rows[parts[0]] = [float(p) for p in parts[1:] if p != "-"]
    return rows


@pytest.mark.slow
# v5p-8 (the 70B configs' slice); v5e compiles in test_plan_lora's LoRA step, and each 7B-width
# compile here costs about a minute of the suite
@pytest.mark.parametrize("tpu, devices", [("v5p-8", 4)])
def test_compiles_7b_width_for_a_slice_with_the_memory_table(tpu, devices, capsys):
    code = cli_main(["compile", "--config", CONFIG, "--tpu", tpu, *SMALL_7B,
                     "--config.model.attention_impl=splash", "--config.train.loss_chunk=128"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "FITS" in out and "attention splash, loss_chunk 128" in out
    rows = _table(out)
    # Arguments are the sharded train state: f32 params and Adam's two f32 moments over
    # `devices` fsdp shards, plus the batch; XLA's figure must agree with that arithmetic.
    cfg = build_trainer(_small_7b_config(), devices=jax.devices()[:1]).abstract_params
    n = sum(x.size for x in jax.tree.leaves(cfg))
    state_gib = n * 4 * 3 / devices / GiB
    assert rows["arguments"][0] == pytest.approx(state_gib, rel=0.01)
    assert rows["peak"][0] >= rows["arguments"][0] and rows["temporaries"][0] > 0
    assert "plan vs XLA (train peak)" in out


def _small_7b_config():
    c = get_default_config()
    c.model = model_section("llama2-7b", num_layers=2)
    return c


@pytest.mark.slow
def test_a_model_that_does_not_fit_exits_3_and_says_by_how_much(capsys):
    # 48 layers of 7B width: the f32 state alone is ~29 GiB a chip on v5e-4's 16 GiB.
    code = cli_main(["compile", "--config", CONFIG, "--tpu", "v5e-4", *SMALL_7B,
                     "--config.model.num_layers=48"])
    out = capsys.readouterr().out
    assert code == 3, out
    assert "DOES NOT FIT" in out and "HBM" in out


def test_config_errors_are_one_line_exit_2(capsys):
    code = cli_main(["compile", "--config", CONFIG, "--tpu", "v5e-4", *SMALL_7B,
                     "--config.mesh.shape=(1,3,1)"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "config.mesh.shape" in err
    assert cli_main(["compile", "--config", CONFIG, "--tpu", "v5e-4", "--slices", "2"]) == 2
    assert "config.mesh.dcn_shape" in capsys.readouterr().err
    assert cli_main(["compile", "--config", CONFIG]) == 2
    assert "--tpu is required" in capsys.readouterr().err


def test_replicated_dims_name_the_parameter_and_rule():
    c = get_default_config()
    c.model = model_section("tiny-llama")  # 4 heads, 2 kv heads
    c.mesh.shape = (1, 1, 4)
    notes = replicated_dims(build_trainer(c, devices=jax.devices()[:4]))
    assert any("kv_heads = 2 is not divisible by mesh tensor = 4" in n
               and "'kv_heads' in config.mesh.rules" in n for n in notes), notes
    assert not any("heads = 4 " in n and "kv_heads" not in n for n in notes)


def test_without_libtpu_says_how_to_install(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        class _NoLibtpu:
            def find_spec(self, name, path=None, target=None):
                if name == "libtpu" or name.startswith("libtpu."):
                    raise ModuleNotFoundError("No module named 'libtpu'")
        sys.meta_path.insert(0, _NoLibtpu())
    """))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "phased_jax.cli", "compile", "--config", CONFIG,
                           "--tpu", "v5p-8"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("phased-jax compile: error: compiling "
                                                            "for TPU needs libtpu")
    assert "pip install -e '.[tpu]'" in proc.stderr


def test_a_mesh_axis_that_splits_a_torus_axis_still_builds():
    # tensor 8 on v5p-128's 4x4x4 torus is no product of whole torus axes; train and compile
    # must still build the mesh (found by compiling Llama-2 70B with --config.mesh.shape=(1,-1,8))
    c = get_default_config()
    c.mesh.shape = (1, -1, 8)
    mesh = make_mesh(c.mesh, tpu_devices(parse_tpu("v5p-128")))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 8}
    assert len({d.id for d in mesh.devices.flat}) == 64


def test_devices_over_several_slices_need_a_dcn_shape_that_spans_them():
    two = tpu_devices(parse_tpu("v5e-4"), num_slices=2)
    c = get_default_config()
    with pytest.raises(ConfigError, match=r"span 2 slices but config.mesh.dcn_shape=\(1, 1, 1\)"):
        make_mesh(c.mesh, two)
    c.mesh.dcn_shape = (2, 1, 1)
    mesh = make_mesh(c.mesh, two)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    # each data-parallel half is one slice: fsdp stays on ICI
    assert all(len({d.slice_index for d in row.flat}) == 1 for row in mesh.devices)
