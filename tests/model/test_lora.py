"""LoRA parity with PEFT on transformers' Llama and Mistral: logits, gradients, adapter files
both ways, and the merged weights."""

from __future__ import annotations

import copy
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phased_jax import hf
from phased_jax.hf.peft import (
    AdapterError,
    from_peft,
    load_adapter,
    merge,
    save_adapter,
    to_peft,
)
from phased_jax.model import Transformer
from phased_jax.model.lora import TARGETS, LoraSpec, join, resolve_targets, split

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from tests.hf.conftest import build_hf_model  # noqa: E402

HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {"llama-gqa": ("llama", dict(num_key_value_heads=2)),
         "mistral-window": ("mistral", dict(num_key_value_heads=2, sliding_window=8))}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    """(our model config, our base params, peft model with random A and B, spec, ids)."""
    arch, overrides = CASES[request.param]
    base = build_hf_model(arch, **overrides)
    d = tmp_path_factory.mktemp(request.param)
    base.save_pretrained(d)
    model, params = hf.load(d, dtype="float32")
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=HF_TARGETS, lora_dropout=0.0,
                             init_lora_weights=False)  # B random too: the update shows
    peft_model = peft.get_peft_model(build_hf_model(arch, **overrides), config).eval()
    spec = LoraSpec(4, 12.0, TARGETS)
    ids = np.random.RandomState(0).randint(3, 128, size=(2, 12))  # longer than the window
    return model.cfg, params, peft_model, spec, ids, d


def _adapter_tensors(peft_model) -> dict[str, np.ndarray]:
    state = peft.get_peft_model_state_dict(peft_model)
    return {k: v.detach().numpy() for k, v in state.items()}


def _ours(cfg, params, spec, adapters, ids):
    model = Transformer(cfg, lora=spec)
    return np.asarray(model.apply({"params": join(params, adapters)}, jnp.asarray(ids)))


def test_logits_equal_peft(pair):
    cfg, params, peft_model, spec, ids, _ = pair
    adapters = from_peft(cfg, spec, _adapter_tensors(peft_model))
    ours = _ours(cfg, params, spec, adapters, ids)
    with torch.no_grad():
        theirs = peft_model(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    plain = np.asarray(Transformer(cfg).apply({"params": params}, jnp.asarray(ids)))
    assert np.abs(ours - plain).max() > 1e-2, "the adapters change the logits"


def test_gradients_of_a_and_b_equal_torch(pair):
    cfg, params, peft_model, spec, ids, _ = pair
    adapters = from_peft(cfg, spec, _adapter_tensors(peft_model))
    weights = np.random.RandomState(2).normal(size=(2, 12, cfg.vocab_size)).astype(np.float32)
    model = Transformer(cfg, lora=spec)

    def loss(a):
        return jnp.sum(model.apply({"params": join(params, a)}, jnp.asarray(ids)) * weights)

    ours = to_peft(cfg, spec, jax.grad(loss)(jax.tree.map(jnp.asarray, adapters)))
    peft_model.zero_grad()
    (peft_model(torch.as_tensor(ids)).logits * torch.as_tensor(weights)).sum().backward()
    theirs = {k.replace(".default", ""): p.grad.numpy()
              for k, p in peft_model.named_parameters() if "lora_" in k}
    assert sorted(ours) == sorted(theirs)
    for k, g in theirs.items():
        np.testing.assert_allclose(ours[k], g, rtol=1e-5, atol=1e-5 * np.abs(g).max(), err_msg=k)


def test_adapter_files_round_trip_through_peft(pair, tmp_path):
    cfg, params, peft_model, spec, ids, base_dir = pair
    adapters = from_peft(cfg, spec, _adapter_tensors(peft_model))
    ours_dir = save_adapter(tmp_path / "ours", cfg, spec, adapters, base=str(base_dir))
    arch = "mistral" if cfg.sliding_window else "llama"
    base = build_hf_model(arch, **CASES["mistral-window" if cfg.sliding_window else "llama-gqa"][1])
    loaded = peft.PeftModel.from_pretrained(base, ours_dir).eval()
    with torch.no_grad():
        theirs = loaded(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(_ours(cfg, params, spec, adapters, ids), theirs, rtol=1e-5,
                               atol=1e-5)
    peft_model.save_pretrained(tmp_path / "theirs")
    spec2, adapters2 = load_adapter(tmp_path / "theirs", cfg)
    assert spec2 == spec
    for k, v in to_peft(cfg, spec, adapters2).items():
        np.testing.assert_array_equal(v, to_peft(cfg, spec, adapters)[k])


def test_merged_weights_equal_peft_merge_and_unload(pair):
    cfg, params, peft_model, spec, ids, _ = pair
    adapters = from_peft(cfg, spec, _adapter_tensors(peft_model))
    merged = merge(cfg, spec, jax.tree.map(np.asarray, params), adapters)
    ours = np.asarray(Transformer(cfg).apply({"params": merged}, jnp.asarray(ids)))
    unloaded = copy.deepcopy(peft_model).merge_and_unload().eval()
    with torch.no_grad():
        theirs = unloaded(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_split_and_join_are_inverse(pair):
    cfg, params, _, spec, _, _ = pair
    full = Transformer(cfg, lora=spec).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    full = jax.tree.map(np.asarray, nn.meta.unbox(full["params"]))
    base, adapters = split(full)
    assert jax.tree.structure(base) == jax.tree.structure(jax.tree.map(np.asarray, params))
    assert sorted(adapters["layers"]["attn"]) == ["lora_k", "lora_o", "lora_q", "lora_v"]
    assert not np.any(adapters["layers"]["mlp"]["lora_up"]["b"]), "B starts at zero"
    a = adapters["layers"]["attn"]["lora_q"]["a"]
    assert a.shape == (cfg.num_layers, cfg.hidden_size, 4)
    assert np.abs(a).max() <= 1 / np.sqrt(cfg.hidden_size)  # kaiming_uniform(a=sqrt(5))
    assert jax.tree.structure(join(base, adapters)) == jax.tree.structure(full)


@pytest.mark.parametrize(("targets", "says"), [
    ("self_attn\\..*", None),
    ("nothing_here", "matches no module; the modules are self_attn.q_proj"),
    (("q", "query"), "'query' is not one of q, k, v"),
])
def test_targets(targets, says):
    if says is None:
        assert resolve_targets(targets) == ("q", "k", "v", "o")
    else:
        with pytest.raises(ValueError, match=says):
            resolve_targets(targets)


@pytest.mark.parametrize(("field", "value", "says"), [
    ("use_dora", True, "DoRA is not supported"),
    ("use_rslora", True, "rsLoRA"),
    ("bias", "lora_only", "trained biases are not supported"),
    ("target_modules", ["q_proj", "lm_head"], "'lm_head' is not one of"),
])
def test_unsupported_peft_adapters_are_named(tmp_path, field, value, says):
    d = tmp_path / "adapter"
    d.mkdir()
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
              "bias": "none", field: value}
    (d / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=says):
        load_adapter(d, None)
