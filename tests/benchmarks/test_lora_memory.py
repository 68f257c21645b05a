"""benchmarks/lora_memory.py and tpu_compile.py's LoRA rows without compiling: the arms'
configs validate and the planner orders them full > LoRA > QLoRA int8 > QLoRA nf4."""

import importlib.util
import sys

from phased_jax import sharding
from phased_jax.config import model_config
from phased_jax.config_checks import validate_config
from phased_jax.model.lora import spec_from_section
from phased_jax.train.plan import make_plan
from tests.conftest import REPO


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_arms_validate_and_plan_in_order(monkeypatch):
    monkeypatch.chdir(REPO)
    bench = _load("lora_memory")
    totals = {}
    for arm in bench.ARMS:
        c = bench.arm_config(arm, 1)
        validate_config(c)
        mesh = sharding.mesh_sizes(c.mesh, 4)
        plan = make_plan(model_config(c.model), c.train, mesh, sharding.rules_from_config(c.mesh),
                         2048, device="v5p", lora=spec_from_section(c.model.lora))
        totals[arm] = plan.total
        assert (plan.base == 0) == (arm == "full")
    assert totals["full"] > totals["lora"] > totals["qlora-int8"] > totals["qlora-nf4"]


def test_tpu_compile_names_each_lora_config_and_its_slice(monkeypatch):
    monkeypatch.chdir(REPO)
    bench = _load("tpu_compile")
    for model, (path, tpu) in bench.LORA.items():
        assert (REPO / path).exists() and tpu in (REPO / path).read_text()
        assert bench.config_path(model) == path
