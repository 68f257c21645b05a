import numpy as np
import pytest

from phased_jax import sharding
from phased_jax.config import get_default_config
from phased_jax.errors import ConfigError
from phased_jax.model.config import get_preset
from phased_jax.model.flops import flops_per_token
from phased_jax.train import plan

HF_LLAMA2_7B_PARAMS = 6_738_415_616


def test_llama2_7b_param_count_matches_hf_and_shards_evenly():
    cfg = get_preset("llama2-7b")
    rules = sharding.rules_from_config(get_default_config().mesh)
    count, per_device = plan.sharded_param_bytes(cfg, {"data": 1, "fsdp": 8, "tensor": 1}, rules, 4)
    assert count == HF_LLAMA2_7B_PARAMS
    # everything but the 4096-wide norms splits 8 ways along `embed`
    assert per_device == pytest.approx(4 * count / 8, rel=1e-6)


def test_llama2_7b_flops_per_token_hand_count():
    seq = 2048
    d, f, v, layers = 4096, 11008, 32000, 32
    macs_attn_proj = 4 * d * d  # q, k, v, o (32 heads x 128 = 4096, no GQA)
    macs_mlp = 3 * d * f  # gate, up, down
    macs_scores = 2 * d * (seq + 1) / 2  # QK^T and PV; causal: a query sees (i+1) keys, mean (L+1)/2
    macs_head = d * v
    forward = 2 * (layers * (macs_attn_proj + macs_mlp + macs_scores) + macs_head)
    assert flops_per_token(get_preset("llama2-7b"), seq) == pytest.approx(3 * forward, rel=1e-12)
    # ~ 6N over the matmul weights (N minus the 131M-entry embedding table: 3.97e10) plus
    # causal attention (6 * 32 layers * 4096 * 1024.5 * 2 = 1.6e9): 4.13e10
    assert 4.1e10 < 3 * forward < 4.15e10


def test_plan_cli_says_whether_it_fits(capsys):
    rc = plan.main(["--preset", "llama2-7b", "--num-devices", "32", "--config.mesh.shape=(1,32,1)",
                    "--config.train.global_batch=128", "--config.data.max_length=2048",
                    "--config.model.remat_policy=full", "--device", "v4"])
    out = capsys.readouterr().out
    assert rc == 0 and "6,738,415,616 parameters" in out and "v4 (32 GiB): FITS" in out
    assert "optimizer" in out and "activations" in out and "at 40% MFU" in out
    rc = plan.main(["--preset", "llama2-7b", "--num-devices", "8", "--config.train.global_batch=16",
                    "--config.model.remat_policy=none", "--device", "v5e"])
    assert rc == 3 and "DOES NOT FIT" in capsys.readouterr().out


def test_plan_reads_the_experiment_config(tmp_path, capsys):
    """The experiment's rules, not the defaults: replicating `embed` (no FSDP) multiplies the
    per-device params by the fsdp size."""
    rules = tuple(r for r in get_default_config().mesh.rules if r[0] != "embed") + (("embed", None),)
    path = tmp_path / "exp.py"
    path.write_text("from phased_jax.paper import paper_config\n\ndef get_config():\n"
                    "    c = paper_config('llama2-7b', '1,2,3', 'x')\n"
                    f"    c.mesh.rules = {rules!r}\n    return c\n")
    per_device = []
    for config_file in ("configs/llama2_7b_phased.py", str(path)):
        assert plan.main(["--config", config_file, "--num-devices", "8"]) in (0, 3)
        out = capsys.readouterr().out
        per_device.append(float(out.split("  params")[1].split("GiB")[0]))
    assert per_device[1] == pytest.approx(per_device[0] * 8, rel=1e-3)


def test_plan_defaults_to_this_machines_devices(capsys):
    import jax

    rc = plan.main(["--preset", "llama2-7b"])
    out = capsys.readouterr().out
    assert rc in (0, 3)
    assert f"devices: {jax.device_count()} (this machine's; give --num-devices N" in out


def test_remat_policies_order_activation_memory():
    cfg = get_preset("llama2-7b")
    est = {p: plan.activation_bytes(cfg, 4 * 2048, 2048, 1, p, 2)
           for p in ("none", "dots", "dots_no_batch", "qkv_proj", "full")}
    assert est["none"] > est["dots"] > est["dots_no_batch"] > est["qkv_proj"] > est["full"]


def test_plan_rejects_a_batch_that_does_not_divide():
    with pytest.raises(ConfigError, match="batch shards"):
        plan.main(["--preset", "llama2-7b", "--num-devices", "32", "--config.train.global_batch=16"])


def test_flash_attention_keeps_o_of_l_scores_and_xla_materialises_them():
    cfg = get_preset("llama2-7b")
    terms = {(flash, seq): plan.activation_breakdown(cfg, 4 * seq, seq, 1, "full", 2, flash=flash)
             for flash in (False, True) for seq in (2048, 4096)}
    # same rows, twice the length: xla's [L, L] scores grow 4x, flash's per-head stats 2x
    xla = terms[False, 4096]["attention_scores"] / terms[False, 2048]["attention_scores"]
    flash = terms[True, 4096]["attention_scores"] / terms[True, 2048]["attention_scores"]
    assert xla == pytest.approx(4, rel=1e-2) and flash == pytest.approx(2, rel=1e-6)
    # xla: 32 heads x 2048 keys of bf16 probs per token (the f32 softmax fuses away) plus f32
    # row statistics, in the working layer
    assert terms[False, 2048]["attention_scores"] == 4 * 2048 * (32 * 2048 * 2 + 2 * 32 * 4)
    assert terms[True, 2048]["attention_scores"] < terms[False, 2048]["attention_scores"] / 100
    # grouped kv heads (Mistral: 8 of 32): the probs' gradient product stays live beside them
    gqa = plan.activation_breakdown(get_preset("mistral-7b-v0.1"), 4 * 2048, 2048, 1, "full", 2)
    assert gqa["attention_scores"] == 4 * 2048 * (32 * 2048 * 2 * 2 + 2 * 32 * 4)
    for key in ("layer_inputs", "policy_saved", "layer_working", "final_hidden", "logits",
                "lm_head"):
        assert terms[False, 2048][key] == terms[True, 2048][key]


def test_loss_chunk_keeps_one_chunks_logits():
    cfg = get_preset("llama2-7b")
    full = plan.activation_breakdown(cfg, 4 * 2048, 2048, 1, "full", 2)
    chunked = plan.activation_breakdown(cfg, 4 * 2048, 2048, 1, "full", 2, loss_chunk=256)
    # 32000 vocab, 4 rows x 2048 positions: bf16 logits + their f32 gradient (the f32 softmax
    # fuses into it); one chunk of 256: its gradient has a bf16 copy too, for the head's matmuls
    assert full["logits"] == 4 * 2048 * 32000 * (2 + 4)
    assert chunked["logits"] == 4 * 256 * 32000 * (2 + 2 + 4)
    # the gathered bf16 head [4096, 32000] and its f32 gradient, whatever the chunking
    assert full["lm_head"] == chunked["lm_head"] == 4096 * 32000 * (2 + 4)
    # chunked, the head and its gradient stay live going back through the layers (XLA runs
    # the loss's forward scan and the head gradient's reduction after them); full, they do not
    no_loss_peak = 10**15  # gradients so large that the loss moment cannot be the peak
    layers = {c: plan.peak_activations(t, no_loss_peak, c) for c, t in ((0, full), (256, chunked))}
    assert layers[0] == (sum(full[k] for k in plan.LAYER_PHASE), "layers")
    assert layers[256][0] - layers[0][0] == (full["lm_head"] + chunked["final_hidden"]
                                             - full["final_hidden"])
    # a small model with Llama-3's vocabulary peaks at the loss: chunking lowers the peak
    wide_vocab = get_preset("tiny-llama", vocab_size=128_256, hidden_size=512)
    full_peak = plan.peak_activations(plan.activation_breakdown(wide_vocab, 8 * 2048, 2048, 1,
                                                                "full", 2))
    chunked_peak = plan.peak_activations(plan.activation_breakdown(
        wide_vocab, 8 * 2048, 2048, 1, "full", 2, loss_chunk=256), loss_chunk=256)
    assert full_peak[1] == "loss" and chunked_peak[0] < full_peak[0] / 2
    # a chunk longer than the sequence is the whole sequence (one chunk of the scan)
    assert plan.activation_breakdown(cfg, 4 * 2048, 2048, 1, "full", 2,
                                     loss_chunk=4096)["logits"] == chunked["logits"] * 8


@pytest.mark.parametrize("impl,device,dtype,packing,flash", [
    ("xla", "v4", "bfloat16", False, False),
    ("dot_product_attention", "h100", "bfloat16", False, False),
    ("splash", "v5p", "bfloat16", False, True),
    ("auto", "v5e", "float32", True, True),  # splash on TPU whatever the dtype or packing
    ("auto", None, "bfloat16", False, True),  # no device: a TPU
    ("auto", "h100", "bfloat16", False, True),  # cudnn
    ("auto", "h100", "float32", False, False),  # cudnn needs bf16/f16: xla
    ("auto", "h200", "bfloat16", True, False),  # cudnn cannot pack: xla
])
def test_planner_resolves_the_attention_impl_by_device(impl, device, dtype, packing, flash):
    assert plan.is_flash(impl, device, dtype=dtype, packing=packing) is flash


def test_plan_terms_sum_and_cli_shows_them(capsys):
    args = ["--preset", "llama2-7b", "--num-devices", "32", "--config.mesh.shape=(1,32,1)",
            "--config.train.global_batch=128", "--config.data.max_length=2048", "--device", "v4"]
    plan.main(args + ["--config.model.attention_impl=xla"])
    xla_out = capsys.readouterr().out
    plan.main(args + ["--config.model.attention_impl=auto", "--config.train.loss_chunk=512"])
    out = capsys.readouterr().out
    assert "attention xla (scores materialised), loss_chunk 0" in xla_out
    assert "attention auto (flash), loss_chunk 512" in out
    assert "at the peak (going back through the layers)" in out
    acts = [float(o.split("  activations")[1].split("GiB")[0]) for o in (xla_out, out)]
    assert acts[1] < acts[0]
    rules = sharding.rules_from_config(get_default_config().mesh)
    c = get_default_config()
    c.train.update(global_batch=128, loss_chunk=512)
    p = plan.make_plan(get_preset("llama2-7b"), c.train, {"data": 1, "fsdp": 32, "tensor": 1},
                       rules, 2048, device="v4")
    # the peak is one moment of the backward pass: the layers' terms, or the loss's
    live = plan.live_terms(p.peak_phase, 512)
    assert p.activations == sum(p.activation_terms[k] for k in live) - (
        p.grads if p.peak_phase == "loss" else 0) > 0
    assert p.activations < sum(p.activation_terms.values())
    itemsize = np.dtype(get_preset("llama2-7b").dtype).itemsize
    # 4 rows per device, one chunk: logits and their gradient in the compute dtype, and the
    # f32 gradient; the gathered head (bf16 + f32 gradient) is live at the layers' peak
    assert p.activation_terms["logits"] == 4 * 512 * 32000 * (2 * itemsize + 4)
    assert "lm_head" in live and p.activation_terms["lm_head"] == 4096 * 32000 * (itemsize + 4)


def test_suggested_mesh_is_the_least_tensor_parallelism_that_fits(capsys):
    # 128 rows cannot split over 256 fsdp shards: tensor 2 is the first mesh that works
    rc = plan.main(["--preset", "llama2-70b", "--num-devices", "256", "--device", "v5p",
                    "--config.mesh.shape=(1,-1,8)", "--config.train.global_batch=128"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "suggested mesh: --config.mesh.shape='(1,-1,2)' (fsdp 128 x tensor 2)" in out
    rules = sharding.rules_from_config(get_default_config().mesh)
    c = get_default_config()
    c.train.global_batch = 128
    cfg = get_preset("llama2-70b", remat_policy="full")
    shape, p = plan.suggest_mesh(cfg, c.train, 256, rules, 2048, 0.9 * 95 * plan.GiB, device="v5p")
    assert shape == (1, 128, 2) and p.total <= 0.9 * 95 * plan.GiB
    # nothing fits 70B on 8 v5e chips: no suggestion, and plan says what to change
    assert plan.suggest_mesh(cfg, c.train, 8, rules, 2048, 0.9 * 16 * plan.GiB, device="v5e") is None
