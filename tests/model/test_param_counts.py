"""Every preset has as many parameters as transformers' model built from its HF config (on
torch's meta device: shapes only), and flops.param_count says the same without tracing."""

from __future__ import annotations

import math

import jax
import pytest

from phased_jax.config import get_default_config
from phased_jax.hf import hf_config_from
from phased_jax.model.config import PRESETS
from phased_jax.model.flops import param_count
from phased_jax.model.params import abstract_params
from phased_jax.train.plan import sharded_param_bytes

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Meta's published sizes (the model cards' and the issue's acceptance numbers).
PUBLISHED = {"llama3-8b": 8_030_261_248, "llama3-70b": 70_553_706_496,
             "llama3.1-8b": 8_030_261_248, "llama3.1-70b": 70_553_706_496,
             "llama2-7b": 6_738_415_616}


def _hf_count(name: str) -> int:
    d = hf_config_from(PRESETS[name])
    cls_cfg, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[PRESETS[name].architecture]
    config = cls_cfg(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = cls_model(config)
    # parameters() lists a tied weight once, as HF's num_parameters() counts it
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_param_count_equals_transformers(name):
    cfg = PRESETS[name]
    ours = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg)))
    assert ours == _hf_count(name) == param_count(cfg)
    if name in PUBLISHED:
        assert ours == PUBLISHED[name]


def test_acceptance_numbers():
    """The issue's numbers, literally: Llama-3 8B and 70B."""
    assert param_count(PRESETS["llama3-8b"]) == 8_030_261_248
    assert param_count(PRESETS["llama3-70b"]) == 70_553_706_496


def test_tied_presets_count_the_table_once():
    for name in ("llama3.2-1b", "llama3.2-3b"):
        cfg = PRESETS[name]
        assert cfg.tie_word_embeddings
        untied = cfg.replace(tie_word_embeddings=False)
        assert param_count(untied) - param_count(cfg) == cfg.vocab_size * cfg.hidden_size
        # the planner's per-device bytes: no head, so one [vocab, hidden] table (over 8 devices)
        rules, mesh = get_default_config().mesh.rules, {"data": 1, "fsdp": 4, "tensor": 2}
        count, nbytes = sharded_param_bytes(cfg, mesh, rules, 2)
        untied_count, untied_bytes = sharded_param_bytes(untied, mesh, rules, 2)
        assert (count, untied_count) == (param_count(cfg), param_count(untied))
        assert untied_bytes - nbytes == 2 * cfg.vocab_size * cfg.hidden_size // 8
    assert param_count(PRESETS["llama3.2-1b"]) == 1_235_814_400  # Meta: "1.23B"
    assert param_count(PRESETS["llama3.2-3b"]) == 3_212_749_824  # Meta: "3.21B"
