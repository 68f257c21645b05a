"""Every experiment file in configs/ loads, and its fields make a valid run (nothing is trained)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from phased_jax.config import model_config
from phased_jax.config_checks import validate_config
from phased_jax.data.phases import build_phases
from phased_jax.data.records import Record
from phased_jax.model.flops import param_count
from phased_jax.sharding import resolve_mesh_shape, rules_from_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.py"))
PAPER = {"llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320,
         "llama2-70b": 68_976_648_192, "mistral-7b-v0.1": 7_241_732_096,
         "llama3-8b": 8_030_261_248, "llama3-70b": 70_553_706_496}  # transformers' counts


def load(path: Path):
    """Load as `--config FILE` does."""
    spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_configs_exist():
    names = {p.stem for p in CONFIGS}
    for want in ("llama2_7b_phased", "llama2_7b_oneoff", "llama2_13b_phased", "llama2_13b_oneoff",
                 "mistral_7b_phased", "mistral_7b_oneoff", "llama2_7b_random_stages",
                 "llama2_7b_order_213", "llama2_7b_stage3_only", "llama2_7b_mixed_13", "demo",
                 "llama3_8b_phased", "llama3_8b_oneoff", "llama3_70b_phased", "llama3_70b_oneoff",
                 "llama2_7b_replay_0.5", "llama2_7b_run_schedule", "llama3_8b_phased_chat"):
        assert want in names, want
    assert len(CONFIGS) >= 22


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_validates(path):
    c = load(path)
    validate_config(c)  # what `--config` runs before any data is read
    cfg = model_config(c.model)  # raises on inconsistent shapes
    rules_from_config(c.mesh)
    resolve_mesh_shape(c.mesh.shape, c.mesh.dcn_shape, 256)  # e.g. a v5e-256 pod
    assert c.train.global_batch % c.train.grad_accum == 0
    records = [Record(str(i), "i", "", "o", score, f"f:{i}")
               for i, score in enumerate((1.0, 2.0, 4.0) * 4)]  # every stage has records
    phases = build_phases(records, c.data.order, tuple(c.data.thresholds), c.data.quantiles, c.seed)
    assert phases and all(p.size for p in phases)
    if c.model.preset in PAPER:  # the paper's runs: its hyperparameters
        assert param_count(cfg) == PAPER[c.model.preset]
        # LoRA configs (configs/lora/) train adapters at LoRA's learning rate, not full
        # fine-tuning's 5e-6 (tests/train/test_plan_lora.py checks them)
        lr = 5e-6 if not c.model.lora.rank else c.train.lr
        assert (c.train.lr, c.train.epochs_per_phase, c.train.global_batch) == (lr, 2, 128)
        assert (c.train.warmup_ratio, c.train.weight_decay, c.train.schedule) == (0.1, 0.1, "cosine")
        assert (c.train.b1, c.train.b2, c.train.clip_norm) == (0.9, 0.95, 1.0)
        assert (c.data.max_length, c.data.packing, c.seed, c.data.template) == (
            2048, False, 3517, "chat" if path.stem.endswith("_chat") else "authors")
        assert c.data.thresholds == (1.5, 3.5)
        assert c.train.schedule_scope == ("run" if path.stem.endswith("run_schedule") else "phase")
        assert c.data.replay == (0.5 if "replay" in path.stem else 0.0)
        assert c.model.init_from and c.data.paths


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem.startswith("llama3_")
                                  and p.parent.name != "lora"],
                         ids=lambda p: p.stem)
def test_llama3_configs_fit_the_slice_their_docstring_names(path):
    """The slice is named once, in the docstring (`phased-jax compile` measured it there); the
    mesh resolves on its chips and the planner agrees it fits (within its 90% margin)."""
    from phased_jax.accelerators import parse_tpu
    from phased_jax.sharding import mesh_sizes
    from phased_jax.train.plan import make_plan

    spec = importlib.util.spec_from_file_location(f"doc_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    name = re.search(r"Fits a TPU (v5p-\d+)", module.__doc__).group(1)
    tpu, c = parse_tpu(name), module.get_config()
    if path.stem.endswith("_chat"):  # the Instruct model's tokenizer: its chat template
        assert c.data.template == "chat" and "Instruct" in c.data.tokenizer
    else:
        assert c.data.tokenizer == c.model.init_from and c.data.template == "authors"
    mesh = mesh_sizes(c.mesh, tpu.chips)
    plan = make_plan(model_config(c.model), c.train, mesh, rules_from_config(c.mesh),
                     int(c.data.max_length), device="v5p")
    assert plan.total < 0.9 * tpu.hbm_gib * 2**30, (name, mesh, plan.total / 2**30)


def test_ablation_orders_are_the_papers():
    orders = {p.stem: load(p).data.order for p in CONFIGS}
    assert orders["llama2_7b_phased"] == "1,2,3" and orders["llama2_7b_oneoff"] == "oneoff"
    assert orders["llama2_7b_order_321"] == "3,2,1" and orders["llama2_7b_mixed_23"] == "2+3"
    assert orders["llama2_7b_after_stage1"] == "1" and orders["llama2_7b_random_stages"] == "random"


def test_train_help_lists_the_flags(capsys):
    from phased_jax.cli import main

    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--local-pod" in out and "--config" in out
