"""A LoRA run end to end (issue 23): the base frozen and in no checkpoint, the adapters carried
across phases and saved as PEFT adapters, exact resume, merged and adapter exports that
transformers and peft load."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from phased_jax import hf
from phased_jax.checkpoint import RunCheckpoints
from phased_jax.config import model_config, model_section
from phased_jax.config_cli import load_config_file
from phased_jax.hf.peft import load_adapter, merge
from phased_jax.model.params import init_params
from phased_jax.params_checkpoint import load_params, save_params
from phased_jax.train.trainer import build_trainer
from tests.runner.runs import phase_events, step_lines, train, write_config

pytestmark = pytest.mark.slow
LORA = """
    c.model.init_from = "{base}"
    c.model.lora.rank = 4
    c.model.lora.alpha = 8.0
    c.export.lora = "both\""""


@pytest.fixture(scope="module")
def lora_run(tiny_experiment, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    m = model_section("tiny-llama", vocab_size=tiny_experiment["vocab"])
    m.dtype = "float32"
    base_cfg = model_config(m)
    base = root / "base"
    save_params(base, base_cfg, init_params(base_cfg, jax.random.key(7)))
    out = root / "run"
    cfg = write_config(tiny_experiment, out, extra=LORA.format(base=base))
    train(cfg)
    return {"cfg": cfg, "out": out, "base": base, "root": root}


def _adapter_tensors(path) -> dict[str, np.ndarray]:
    return load_file(str(path / "adapter_model.safetensors"))


def test_checkpoints_hold_the_adapters_and_their_optimizer_state_only(lora_run):
    out, config = lora_run["out"], load_config_file(str(lora_run["cfg"]))
    trainer = build_trainer(config)
    ends = [e["step"] for e in phase_events(out, "phase_end")]
    ckpts = RunCheckpoints(str(out / "checkpoints"), keep=2, phase_end_steps=ends)
    state, meta = ckpts.restore_latest(trainer.abstract_state(), config.to_json())
    ckpts.close()
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]]
    assert paths and all("lora_" in p for p in paths), paths
    # what each checkpoint stores, from Orbax's own tree metadata: no base tensor, and the
    # arrays' bytes are the adapters' (params, Adam's two moments) at float32
    adapter_floats = sum(x.size for x in jax.tree.leaves(state.params))
    for step in ends:
        tree = json.loads((out / "checkpoints" / str(step) / "state" / "_METADATA").read_text())
        keys = [k for k in tree["tree_metadata"] if k.startswith("('params'")]
        assert keys and all("lora_" in k for k in keys), keys
        data = [f.stat().st_size for f in (out / "checkpoints" / str(step) / "state" / "d")
                .iterdir()]
        assert max(data) < 4 * 3 * adapter_floats + 4096, (step, data, adapter_floats)


def test_phases_carry_the_adapters_and_the_base_is_untouched(lora_run):
    out, config = lora_run["out"], load_config_file(str(lora_run["cfg"]))
    cfg = model_config(config.model)
    dirs = sorted((out / "phases").iterdir())
    assert [d.name for d in dirs] == ["phase1-stage1", "phase2-stage2", "phase3-stage3"]
    specs, tensors = zip(*[load_adapter(d, cfg) for d in dirs], strict=True)
    assert all(s.rank == 4 and s.alpha == 8.0 and len(s.targets) == 7 for s in specs)
    b1 = tensors[0]["layers"]["attn"]["lora_q"]["b"]
    b2 = tensors[1]["layers"]["attn"]["lora_q"]["b"]
    assert np.abs(b1).max() > 0 and not np.array_equal(b1, b2)
    # the exported adapter is the last phase's
    final = _adapter_tensors(out / "adapter")
    for k, v in _adapter_tensors(dirs[-1]).items():
        np.testing.assert_array_equal(final[k], v)
    # the merged export is base + scale * A B of that adapter, the base as it was
    _, base = load_params(lora_run["base"])
    spec, adapters = load_adapter(out / "adapter", cfg)
    want = merge(cfg, spec, jax.tree.map(np.asarray, base), adapters)
    _, got = hf.load(out / "hf", dtype="float32")
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0],
                            jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(b), a, rtol=1e-6, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))


def test_peft_on_the_base_gives_the_merged_models_logits(lora_run):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    out, root = lora_run["out"], lora_run["root"]
    cfg, base = load_params(lora_run["base"])
    hf.save(root / "base_hf", cfg, base)
    ids = torch.as_tensor(np.random.RandomState(0).randint(3, cfg.vocab_size, size=(2, 10)))
    with torch.no_grad():
        base_model = transformers.AutoModelForCausalLM.from_pretrained(root / "base_hf")
        adapted = peft.PeftModel.from_pretrained(base_model, out / "adapter").eval()
        merged = transformers.AutoModelForCausalLM.from_pretrained(out / "hf").eval()
        np.testing.assert_allclose(adapted(ids).logits.numpy(), merged(ids).logits.numpy(),
                                   rtol=1e-4, atol=1e-4)


def test_sigkill_mid_phase_2_then_rerun_is_exact(tiny_experiment, lora_run, tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tiny_experiment, out, extra=LORA.format(base=lora_run["base"]))
    ends = [e["step"] for e in phase_events(lora_run["out"], "phase_end")]
    kill = ends[0] + 3
    assert train(cfg, kill_after=kill, check=False).returncode == -9
    resumed = train(cfg)
    assert "resuming phase" in resumed.stdout
    assert step_lines(out) == list(range(1, ends[-1] + 1))
    for name in ("adapter", "phases/phase2-stage2", "phases/phase3-stage3"):
        a, b = _adapter_tensors(out / name), _adapter_tensors(lora_run["out"] / name)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}: {k}")


def test_adapters_start_from_a_peft_adapter_and_a_mismatch_is_one_line(tiny_experiment,
                                                                       lora_run, tmp_path):
    start = lora_run["out"] / "phases" / "phase1-stage1"
    out = tmp_path / "from_adapter"
    extra = LORA.format(base=lora_run["base"]) + f"""
    c.model.lora.init_from = "{start}"
    c.data.order = "3"
    c.data.replay = 0.0
    c.train.max_steps_per_phase = 1
    c.train.lr = 1e-12"""
    train(write_config(tiny_experiment, out, extra=extra))
    got, want = _adapter_tensors(out / "adapter"), _adapter_tensors(start)
    for k in want:  # one step at lr 1e-12 from the given adapter
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-9, err_msg=k)
    bad = train(write_config(tiny_experiment, tmp_path / "bad", extra=extra.replace(
        "c.model.lora.rank = 4", "c.model.lora.rank = 8")), check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert ("the adapter's rank is 4, the config's model.lora.rank is 8; set "
            "--config.model.lora.rank to match the adapter") in bad.stderr


def test_resuming_onto_another_base_is_refused(tiny_experiment, lora_run, tmp_path):
    cfg, base = load_params(lora_run["base"])
    other = tmp_path / "other_base"
    save_params(other, cfg, init_params(cfg, jax.random.key(8)))
    out = tmp_path / "run"
    shutil.copytree(lora_run["out"], out)
    proc = train(write_config(tiny_experiment, out, extra=LORA.format(base=other)), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"trained on the base {lora_run['base']}" in proc.stderr
    assert f"model.init_from={other} gives fingerprint" in proc.stderr


def test_resuming_with_another_rank_names_the_field(tiny_experiment, lora_run, tmp_path):
    """A finished LoRA run rerun with rank 8: its checkpoints' adapters do not fit, and the one
    line (exit 1, as every checkpoint that does not fit) names model.lora.rank's change."""
    out = tmp_path / "run"
    shutil.copytree(lora_run["out"], out)
    extra = LORA.format(base=lora_run["base"]).replace("rank = 4", "rank = 8")
    proc = train(write_config(tiny_experiment, out, extra=extra), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "does not fit this config" in proc.stderr
    assert "model.lora.rank: 4 -> 8" in proc.stderr
