"""Tiny random Llama/Mistral checkpoints written by transformers itself (PyTorch, CPU).

Built once per session; tests that damage a checkpoint copy it first (`hf_copy`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, initializer_range=0.15)
CASES: dict[str, tuple[str, dict]] = {
    "llama-gqa": ("llama", dict(num_key_value_heads=2)),
    "llama-mha-theta-eps": ("llama", dict(num_key_value_heads=4, rms_norm_eps=1e-3,
                                          rope_parameters={"rope_type": "default",
                                                           "rope_theta": 50.0})),
    "mistral-window": ("mistral", dict(num_key_value_heads=2, sliding_window=8)),
}


def build_hf_model(arch: str, seed: int = 0, **overrides):
    """A randomly initialised HF model in eval mode, with norm scales randomised too (so a
    swapped norm would show)."""
    cls_cfg, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    config = cls_cfg(**{**_SMALL, **overrides})
    config._attn_implementation = "eager"
    model = cls_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model


def save_hf_model(tmp_path_factory, name: str, arch: str, **overrides) -> tuple[Path, object]:
    """(directory, torch model): `build_hf_model(arch, **overrides)` saved by save_pretrained."""
    model = build_hf_model(arch, **overrides)
    directory = tmp_path_factory.mktemp(name)
    model.save_pretrained(directory)
    return directory, model


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """name -> (directory, torch model); each case saved once with save_pretrained."""
    made: dict[str, tuple[Path, object]] = {}

    def get(name: str):
        if name not in made:
            arch, overrides = CASES[name]
            made[name] = save_hf_model(tmp_path_factory, name, arch, **overrides)
        return made[name]

    return get


@pytest.fixture
def hf_copy(hf_checkpoint, tmp_path):
    """A fresh copy of the llama-gqa checkpoint to break."""
    directory, _ = hf_checkpoint("llama-gqa")
    dst = tmp_path / "ckpt"
    shutil.copytree(directory, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(20)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")
