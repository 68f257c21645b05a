"""LoRA runs beyond the plain one (issue 23): adapters merged into the base at each phase end
(with adapter dropout on), and QLoRA (an NF4 base read from an HF directory). Each is killed
mid-phase 2 and rerun: QLoRA in one process ends bitwise where the uninterrupted run ends; the
merging run, killed and resumed as a local pod, ends there up to float32 reduction order."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from phased_jax import hf
from phased_jax.config import get_default_config, model_config, model_section
from phased_jax.generate.run import load_model, merged_base, run_models, with_adapter
from phased_jax.hf.peft import load_adapter, merged_first
from phased_jax.model.lora import merge
from phased_jax.model.params import init_params
from phased_jax.params_checkpoint import save_params
from phased_jax.sharding import Placement
from tests.runner.runs import phase_events, step_lines, train, write_config

pytestmark = pytest.mark.slow
SHORT = """
    c.train.max_steps_per_phase = 4
    c.checkpoint.every_steps = 1
    c.train.eval_every = 0
    c.model.lora.rank = 4
    c.model.lora.alpha = 8.0"""
MERGE = SHORT + """
    c.model.init_from = "{base}"
    c.model.lora.merge_each_phase = True
    c.model.lora.dropout = 0.1
    c.export.lora = "merged\""""
QLORA = SHORT + """
    c.model.init_from = "{base}"
    c.model.lora.base_qtype = "nf4"
    c.export.lora = "both\""""


def _killed_and_rerun_equals_uninterrupted(exp, tmp_path, extra: str, pod: bool = False
                                           ) -> tuple:
    """(uninterrupted run dir, killed-then-rerun run dir, phase-end steps), compared: bitwise
    in one process; with `pod` the killed run is a local pod (2 processes x 4 devices), equal
    up to float32 reduction order (the test config's Adam eps makes an update proportional to
    its gradient, so after T steps of lr a noise-level difference is far below 1e-4 lr T)."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(write_config(exp, whole, extra=extra))
    ends = [e["step"] for e in phase_events(whole, "phase_end")]
    assert len(ends) == 3 and ends[1] - ends[0] >= 3, ends
    cfg = write_config(exp, cut, extra=extra)
    args = ("--local-pod", "2", "--local-devices", "4") if pod else ()
    assert train(cfg, *args, kill_after=ends[0] + 2, check=False).returncode != 0
    resumed = train(cfg, *args)
    assert "resuming phase 2" in resumed.stdout, resumed.stdout[-2000:]
    assert step_lines(cut) == list(range(1, ends[-1] + 1))
    same = (np.testing.assert_array_equal if not pod else functools.partial(
        np.testing.assert_allclose, rtol=0, atol=1e-4 * 1e-3 * ends[-1]))
    for d in sorted((whole / "phases").iterdir()):
        a, b = (load_file(str(r / "phases" / d.name / "adapter_model.safetensors"))
                for r in (whole, cut))
        for k in a:
            same(a[k], b[k], err_msg=f"{d.name}: {k}")
    _, got = hf.load(cut / "hf", dtype="float32")
    _, want = hf.load(whole / "hf", dtype="float32")
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        same(np.asarray(x), np.asarray(y))
    return whole, cut, ends


def test_merge_each_phase_with_dropout(tiny_experiment, tmp_path):
    m = model_section("tiny-llama", vocab_size=tiny_experiment["vocab"])
    m.dtype = "float32"
    cfg = model_config(m)
    base_params = init_params(cfg, jax.random.key(7))
    save_params(tmp_path / "base", cfg, base_params)
    whole, _, _ = _killed_and_rerun_equals_uninterrupted(
        tiny_experiment, tmp_path, MERGE.format(base=tmp_path / "base"), pod=True)
    dirs = sorted((whole / "phases").iterdir())
    assert [[p.name for p in merged_first(d)] for d in dirs] == [
        [], ["phase1-stage1"], ["phase1-stage1", "phase2-stage2"]]
    # the export: the base with each phase's adapters merged in turn, by the same merge
    base = jax.tree.map(jnp.asarray, base_params)
    for d in dirs:
        spec, adapters = load_adapter(d, cfg)
        base = merge(cfg, spec, base, adapters)
    _, got = hf.load(whole / "hf", dtype="float32")
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(base),
                            strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))
    # generate --run puts each phase's adapter on the base with the earlier phases merged in
    models = run_models(str(whole), str(tmp_path / "base"))
    assert [m.merged for m in models[:3]] == [
        (), (str(dirs[0]),), (str(dirs[0]), str(dirs[1]))]
    placement = Placement.from_config(get_default_config().mesh)
    model, params = load_model(str(tmp_path / "base"), placement, None, hf=False)
    model, params = with_adapter(*merged_base(models[2], model, params), models[2], placement)
    ids = jnp.asarray(np.random.RandomState(0).randint(3, cfg.vocab_size, size=(2, 12)))
    final_model, final_params = load_model(str(whole / "hf"), placement, None, hf=True)
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, ids)),
                               np.asarray(final_model.apply({"params": final_params}, ids)),
                               rtol=1e-5, atol=1e-5)


def test_qlora_nf4_from_an_hf_base(tiny_experiment, tmp_path):
    m = model_section("tiny-llama", vocab_size=tiny_experiment["vocab"])  # MLP 176: blocks of 16
    m.dtype = "float32"
    cfg = model_config(m)
    hf.save(tmp_path / "base_hf", cfg, init_params(cfg, jax.random.key(7)))
    whole, _, ends = _killed_and_rerun_equals_uninterrupted(
        tiny_experiment, tmp_path, QLORA.format(base=tmp_path / "base_hf"))
    # checkpoints: adapters and their moments only (the nf4 base would be ~1/7 of float32's)
    spec, adapters = load_adapter(whole / "adapter", cfg)
    floats = sum(x.size for x in jax.tree.leaves(adapters))
    for step in ends:
        data = [f.stat().st_size for f in (whole / "checkpoints" / str(step) / "state" / "d")
                .iterdir()]
        assert max(data) < 4 * 3 * floats + 4096, (step, data, floats)
    assert spec.base_qtype == ""  # a PEFT adapter of the unquantised base
