"""`phased-jax plan` and `compile` for LoRA and QLoRA: the frozen base in its storage form, no
base gradient or moments, float32 adapters with theirs; the configs in configs/lora/ fit the
slice their docstrings name."""

from __future__ import annotations

import importlib.util
import math
import re
import types
from pathlib import Path

import pytest

from phased_jax import sharding
from phased_jax.accelerators import parse_tpu
from phased_jax.cli import main as cli_main
from phased_jax.config import get_default_config, model_config
from phased_jax.model.config import get_preset
from phased_jax.model.lora import LoraSpec, spec_from_section
from phased_jax.train import plan

LORA_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "lora").glob("*.py"))
MESH4 = {"data": 1, "fsdp": 4, "tensor": 1}
RULES = sharding.rules_from_config(get_default_config().mesh)
SEVEN = ("q", "k", "v", "o", "gate", "up", "down")


def _train(global_batch=128, grad_accum=4, **kw):
    c = get_default_config()
    c.train.update(global_batch=global_batch, grad_accum=grad_accum, loss_chunk=512, **kw)
    return c.train


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"lora_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_llama2_70b_rank_16_adapters_count_as_peft_does():
    # PEFT's r * (in + out) per module: q, o 2 x 8192; k, v 8192 + 1024; gate, up, down
    # 8192 + 28672; 80 layers
    cfg = get_preset("llama2-70b")
    per_layer = 16 * (2 * 2 * 8192 + 2 * (8192 + 1024) + 3 * (8192 + 28672))
    assert plan.adapter_layer_count(cfg, LoraSpec(16, 32.0, SEVEN)) == per_layer
    p = plan.make_plan(cfg.replace(param_dtype="bfloat16"), _train(), MESH4, RULES, 2048,
                       lora=LoraSpec(16, 32.0, SEVEN))
    assert p.trainable_params == 80 * per_layer == 207_093_760
    assert p.num_params == 68_976_648_192  # the model's, as transformers counts it


def test_lora_plan_freezes_the_base_and_trains_float32_adapters():
    cfg = get_preset("llama2-7b", remat_policy="full", dtype="bfloat16", param_dtype="bfloat16")
    spec = LoraSpec(16, 32.0, SEVEN)
    full = plan.make_plan(cfg, _train(), MESH4, RULES, 2048)
    lora = plan.make_plan(cfg, _train(), MESH4, RULES, 2048, lora=spec)
    adapters = 32 * plan.adapter_layer_count(cfg, spec)
    # the base as stored (bf16) over 4 fsdp shards; the adapters float32, laid out as their
    # weights: the `embed` axes (A of q, k, v, gate, up; B of o, down) split 4 ways, the rest
    # (heads and mlp axes: `tensor` only) whole
    assert lora.base == full.params
    split, whole = 7 * 4096 * 16, (4096 + 11008 + 3 * 4096 + 2 * 11008) * 16
    assert lora.params - lora.base == 32 * 4 * (split // 4 + whole)
    # gradients (and, with accumulation, their accumulator) and AdamW's two moments: the
    # adapters' only, in float32
    assert lora.grads == 2 * (lora.params - lora.base)
    assert lora.opt_state == 2 * (lora.params - lora.base)
    assert lora.trainable_params == adapters
    # the frozen head is gathered but has no gradient; the gathered layer no f32 gradient;
    # the qkv and wi stacks have XLA's relaid copy (bf16, 4 shards)
    t_full, t_lora = full.activation_terms, lora.activation_terms
    assert t_lora["lm_head"] == 4096 * 32000 * 2 and t_full["lm_head"] == 4096 * 32000 * (2 + 4)
    assert t_lora["gathered_layer"] < t_full["gathered_layer"] / 2
    qkv_wi = 32 * 4096 * (3 * 4096 + 2 * 11008)
    assert t_lora["base_relayout"] == qkv_wi * 2 // 4 and t_full["base_relayout"] == 0
    for k in ("layer_inputs", "layer_working", "attention_scores", "logits"):
        assert t_lora[k] == t_full[k]
    # no weight gradients of the base: about two thirds of the FLOPs
    assert 0.6 < lora.flops_per_step / full.flops_per_step < 0.72


def test_opt_state_dtype_sets_the_first_moment_only():
    """optax keeps mu in `mu_dtype` and nu in the params' dtype."""
    cfg = get_preset("llama2-7b", remat_policy="full", dtype="bfloat16", param_dtype="float32")
    f32 = plan.make_plan(cfg, _train(), MESH4, RULES, 2048)
    bf16_mu = plan.make_plan(cfg, _train(opt_state_dtype="bfloat16"), MESH4, RULES, 2048)
    assert bf16_mu.opt_state == pytest.approx(f32.opt_state * 3 / 4, rel=1e-6)


@pytest.mark.parametrize("qtype, per_param", [("int8", 1 + 4 / 64), ("nf4", 0.5 + 4 / 64)])
def test_qlora_layer_storage_is_codes_and_absmax(qtype, per_param):
    cfg = get_preset("llama2-70b", param_dtype="bfloat16")
    spec = types.SimpleNamespace(base_qtype=qtype)  # all layer_storage_bytes reads of a LoraSpec
    proj = 8192 * (64 + 2 * 8) * 128 + 64 * 128 * 8192 + 3 * 8192 * 28672
    assert plan.layer_storage_bytes(cfg, spec) == pytest.approx(proj * per_param + 2 * 8192 * 2)


@pytest.mark.parametrize("path", LORA_CONFIGS, ids=lambda p: p.stem)
def test_lora_configs_fit_the_slice_their_docstring_names(path):
    """Each names its slice and accumulation once, in the docstring (`phased-jax compile`
    measured it there); its fields say the same and the planner agrees it fits."""
    module = _load(path)
    name = re.search(r"Fits a TPU (v5[ep]-\d+)", module.__doc__).group(1)
    accum = int(re.search(r"train\.grad_accum=(\d+)", module.__doc__).group(1))
    c = module.get_config()
    tpu = parse_tpu(name)
    spec = spec_from_section(c.model.lora)
    assert spec is not None and spec.rank == 16 and spec.targets == SEVEN
    assert c.model.init_from and c.model.lora.merge_each_phase is False
    assert c.train.grad_accum == accum and c.train.global_batch == 128
    assert c.data.max_length == 2048
    assert ("qlora" in path.stem) == bool(c.model.lora.base_qtype)
    mesh = sharding.mesh_sizes(c.mesh, tpu.chips)
    p = plan.make_plan(model_config(c.model), c.train, mesh, sharding.rules_from_config(c.mesh),
                       2048, device=tpu.generation, lora=spec)
    assert p.total < 0.9 * tpu.hbm_gib * 2**30, (name, mesh, p.total / 2**30)
    if accum > 1:  # the accumulation is needed: one micro-batch of the whole batch does not fit
        c.train.grad_accum = 1
        p1 = plan.make_plan(model_config(c.model), c.train, mesh,
                            sharding.rules_from_config(c.mesh), 2048, device=tpu.generation,
                            lora=spec)
        assert p1.total > 0.9 * tpu.hbm_gib * 2**30


def test_plan_cli_shows_lora(capsys):
    path = next(p for p in LORA_CONFIGS if p.stem == "llama2_70b_phased_lora")
    rc = cli_main(["plan", "--config", str(path), "--num-devices", "4", "--device", "v5p"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "LoRA rank 16 on q,k,v,o,gate,up,down: 207,093,760 trainable parameters" in out
    assert "68,976,648,192 parameters" in out and "frozen base" in out
    assert "(adapters only)" in out and "base_relayout" in out


@pytest.mark.slow
def test_compile_of_a_lora_step_matches_the_plans_arguments(capsys):
    """Two layers of Llama-2 70B's width with rank-16 adapters on v5e-4: XLA's arguments are
    the bf16 base, the f32 adapters and their two moments, as the plan says (xla attention:
    the arguments do not depend on the kernel, and splash's compile doubles the test's time)."""
    path = next(p for p in LORA_CONFIGS if p.stem == "llama2_70b_phased_lora")
    code = cli_main(["compile", "--config", str(path), "--tpu", "v5e-4",
                     "--steps=train", "--config.model.num_layers=2", "--config.train.global_batch=8",
                     "--config.train.grad_accum=1", "--config.data.max_length=256",
                     "--config.train.loss_chunk=128", "--config.model.attention_impl=xla"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "LoRA rank 16" in out and "frozen base in bfloat16" in out
    rows = {ln.split()[0]: [float(x) for x in ln.split()[1:]] for ln in out.splitlines()
            if ln.split() and ln.split()[0] in ("arguments", "peak")}
    xla, planned = rows["arguments"]
    assert xla == pytest.approx(planned, rel=0.02)
    assert math.isfinite(rows["peak"][0]) and rows["peak"][0] > xla
