"""Model shapes and numerics: one dataclass for Llama-2/3 and Mistral, and the named presets."""

from __future__ import annotations

import dataclasses
from typing import Any

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "qkv_proj")
# see phased_jax.model.attention; "auto": splash on TPU, cudnn on GPU, xla elsewhere
ATTENTION_IMPLS = ("xla", "dot_product_attention", "splash", "cudnn", "auto")
ATTENTION_BLOCK_MULTIPLE = 128  # TPU lane width: splash's block sizes are multiples of it
# How RoPE's frequencies are stretched for contexts beyond pretraining (transformers'
# `rope_scaling.rope_type`); "none" is plain RoPE. See phased_jax.model.rope.
ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the decoder's parameters and numerics.

    `architecture` only changes how the model is named in Hugging Face files; the maths of
    Llama-2, Llama-3 and Mistral differ only by `sliding_window`, RoPE's base and scaling and
    the vocabulary.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # RoPE scaling (one of ROPE_SCALINGS) and its parameters, flat so each is overridable from
    # the command line. factor: context stretch; original_max_position: pretraining context
    # (0 = max_position_embeddings); low/high_freq_factor: llama3's band edges; beta_fast/slow,
    # attention_factor (0 = yarn's default 0.1 ln(factor) + 1; a file's mscale/mscale_all_dim
    # are folded into it on load), truncate (round the ramp's ends to whole dimensions): yarn's.
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    rope_scaling_original_max_position: int = 0
    rope_scaling_low_freq_factor: float = 1.0
    rope_scaling_high_freq_factor: float = 4.0
    rope_scaling_beta_fast: float = 32.0
    rope_scaling_beta_slow: float = 1.0
    rope_scaling_attention_factor: float = 0.0
    rope_scaling_truncate: bool = True
    tie_word_embeddings: bool = False  # the LM head is the embedding table (Llama-3.2 1B/3B)
    sliding_window: int = 0  # 0: full causal attention
    architecture: str = "llama"  # "llama" | "mistral"
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    initializer_range: float = 0.02
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of parameters
    remat_policy: str = "none"  # one of REMAT_POLICIES
    attention_impl: str = "xla"  # one of ATTENTION_IMPLS
    # splash's query and key/value block sizes (forward and backward); cut to the sequence
    # length when longer. 512: MaxText's splash default.
    attention_block_q: int = 512
    attention_block_kv: int = 512

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        problems = []
        if self.num_heads % self.num_kv_heads:
            problems.append(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            problems.append(f"head_dim ({self.head_dim}) must be even for RoPE")
        if self.remat_policy not in REMAT_POLICIES:
            problems.append(f"remat_policy {self.remat_policy!r} is not one of {REMAT_POLICIES}")
        if self.architecture not in ("llama", "mistral"):
            problems.append(f"architecture {self.architecture!r} is not 'llama' or 'mistral'")
        if self.rope_scaling not in ROPE_SCALINGS:
            problems.append(f"rope_scaling {self.rope_scaling!r} is not one of {ROPE_SCALINGS}")
        elif self.rope_scaling != "none" and self.rope_scaling_factor < 1.0:
            problems.append(f"rope_scaling_factor ({self.rope_scaling_factor}) must be >= 1")
        elif self.rope_scaling == "llama3" and not (
                0 < self.rope_scaling_low_freq_factor < self.rope_scaling_high_freq_factor):
            problems.append(f"rope_scaling_low_freq_factor ({self.rope_scaling_low_freq_factor}) "
                            f"must be > 0 and below rope_scaling_high_freq_factor "
                            f"({self.rope_scaling_high_freq_factor})")
        if self.attention_impl not in ATTENTION_IMPLS:
            problems.append(f"attention_impl {self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
        for name in ("attention_block_q", "attention_block_kv"):
            block = getattr(self, name)
            if not isinstance(block, int) or block <= 0 or block % ATTENTION_BLOCK_MULTIPLE:
                problems.append(f"{name} ({block!r}) must be a positive multiple of "
                                f"{ATTENTION_BLOCK_MULTIPLE}")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def group_size(self) -> int:
        """Query heads served by one key/value head (1 for multi-head attention)."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)


_LLAMA2 = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
# Meta's config.json for the base models: 128,256 tokens, <|begin_of_text|> 128000,
# <|end_of_text|> 128001, no pad token (we pad with <|end_of_text|>; padding is masked).
_LLAMA3 = dict(vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000,
               eos_token_id=128001, pad_token_id=128001)
_LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                  num_kv_heads=8)
_LLAMA3_70B = dict(hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                   num_kv_heads=8)
# 3.1: 128K context by the `llama3` RoPE scaling of the 8K pretraining context.
_LLAMA31 = dict(_LLAMA3, max_position_embeddings=131072, rope_scaling="llama3",
                rope_scaling_factor=8.0, rope_scaling_original_max_position=8192,
                rope_scaling_low_freq_factor=1.0, rope_scaling_high_freq_factor=4.0)
# 3.2 1B/3B: the 3.1 context with scaling factor 32, and the head tied to the embedding.
_LLAMA32 = dict(_LLAMA31, rope_scaling_factor=32.0, tie_word_embeddings=True)

PRESETS: dict[str, ModelConfig] = {
    "llama2-7b": ModelConfig(
        hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
        **_LLAMA2,
    ),
    "llama2-13b": ModelConfig(
        hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40,
        **_LLAMA2,
    ),
    "llama2-70b": ModelConfig(
        hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8,
        **_LLAMA2,
    ),
    "mistral-7b-v0.1": ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
        sliding_window=4096, architecture="mistral",
    ),
    "llama3-8b": ModelConfig(**_LLAMA3_8B, max_position_embeddings=8192, **_LLAMA3),
    "llama3-70b": ModelConfig(**_LLAMA3_70B, max_position_embeddings=8192, **_LLAMA3),
    "llama3.1-8b": ModelConfig(**_LLAMA3_8B, **_LLAMA31),
    "llama3.1-70b": ModelConfig(**_LLAMA3_70B, **_LLAMA31),
    "llama3.2-1b": ModelConfig(
        hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
        head_dim=64, **_LLAMA32,
    ),
    "llama3.2-3b": ModelConfig(
        hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24, num_kv_heads=8,
        head_dim=128, **_LLAMA32,
    ),
    # Test and demo sizes: small enough to compile and train on two CPU cores.
    "tiny-llama": ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
        num_kv_heads=2, max_position_embeddings=512,
    ),
    "tiny-mistral": ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
        num_kv_heads=2, max_position_embeddings=512, sliding_window=8, architecture="mistral",
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name, with field overrides (e.g. dtype="bfloat16")."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
