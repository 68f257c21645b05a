"""Rotary position embeddings: the one home of RoPE's frequencies, tables and rotation.

The inverse frequencies are computed once per config on the host, in numpy float32 with the
same operations in the same order as transformers' `modeling_rope_utils` (including PyTorch's
`a / tensor` = `reciprocal(tensor) * a`; only pow differs, ours correctly rounded, PyTorch's
within a float32 ulp of it), so a checkpoint trained with `llama3`, `linear` or `yarn` scaling
sees the frequencies it was trained with at every position, including those beyond
`original_max_position_embeddings`. `dynamic` NTK scaling changes with the running sequence
length and `longrope` switches tables by it; neither is implemented: `ModelConfig.rope_scaling`
does not accept them and `phased_jax.hf.hf_config` refuses them in a config.json, naming the field.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from phased_jax.model.config import ModelConfig

Array = jax.Array
_F32 = np.float32


def original_max_position(cfg: ModelConfig) -> int:
    """The pretraining context the scaling stretches (0 in the config: max_position_embeddings)."""
    return cfg.rope_scaling_original_max_position or cfg.max_position_embeddings


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """yarn's attention factor for a context stretch `factor`: 0.1 mscale ln(factor) + 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(cfg: ModelConfig) -> float:
    """yarn's cos/sin multiplier: the config's, or the paper's default for its factor."""
    if cfg.rope_scaling_attention_factor:
        return float(cfg.rope_scaling_attention_factor)
    return yarn_mscale(cfg.rope_scaling_factor)


def attention_scaling(cfg: ModelConfig) -> float:
    """What cos and sin are multiplied by (1 except for yarn), as transformers does."""
    return yarn_attention_factor(cfg) if cfg.rope_scaling == "yarn" else 1.0


def _pow(base: float, exponent: np.ndarray) -> np.ndarray:
    """float32 base ** exponent, correctly rounded (float64, then rounded): PyTorch's CPU
    float32 pow (the reference) is within 1 ulp of it; numpy's own float32 pow is not always."""
    return (np.float64(_F32(base)) ** exponent.astype(np.float64)).astype(_F32)


def _exponents(dim: int) -> np.ndarray:
    return np.arange(0, dim, 2, dtype=_F32) / _F32(dim)


def _default_inv_freq(theta: float, dim: int) -> np.ndarray:
    return _F32(1.0) / _pow(theta, _exponents(dim))


def _llama3(inv: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    factor = _F32(cfg.rope_scaling_factor)
    low, high = cfg.rope_scaling_low_freq_factor, cfg.rope_scaling_high_freq_factor
    old_context = original_max_position(cfg)
    wavelen = (_F32(1.0) / inv) * _F32(2 * math.pi)
    scaled = np.where(wavelen > _F32(old_context / low), inv / factor, inv)
    smooth = ((_F32(1.0) / wavelen) * _F32(old_context) - _F32(low)) / _F32(high - low)
    smoothed = (_F32(1.0) - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < _F32(old_context / high)) & ~(wavelen > _F32(old_context / low))
    return np.where(medium, smoothed, scaled)


def _yarn(cfg: ModelConfig, dim: int) -> np.ndarray:
    base, factor = cfg.rope_theta, cfg.rope_scaling_factor
    pos_freqs = _pow(base, _exponents(dim))
    extrapolation = _F32(1.0) / pos_freqs
    interpolation = _F32(1.0) / (_F32(factor) * pos_freqs)

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times
        return (dim * math.log(original_max_position(cfg) / (rotations * 2 * math.pi))
                ) / (2 * math.log(base))

    low = correction_dim(cfg.rope_scaling_beta_fast)
    high = correction_dim(cfg.rope_scaling_beta_slow)
    if cfg.rope_scaling_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=_F32) - _F32(low)) / _F32(high - low), 0, 1)
    extrapolation_factor = _F32(1.0) - ramp
    return (interpolation * (_F32(1.0) - extrapolation_factor)
            + extrapolation * extrapolation_factor)


@functools.lru_cache(maxsize=64)
def inv_freq(cfg: ModelConfig) -> np.ndarray:
    """RoPE's inverse frequencies [head_dim // 2], float32, for the config's scaling type."""
    dim = cfg.head_dim
    if cfg.rope_scaling == "yarn":
        out = _yarn(cfg, dim)
    else:
        out = _default_inv_freq(cfg.rope_theta, dim)
        if cfg.rope_scaling == "linear":
            out = out / _F32(cfg.rope_scaling_factor)
        elif cfg.rope_scaling == "llama3":
            out = _llama3(out, cfg)
    out = np.asarray(out, _F32)
    out.setflags(write=False)
    return out


def rope_tables(positions_BxL: Array, cfg: ModelConfig) -> tuple[Array, Array]:
    """cos and sin [batch, L, head_dim] in float32, laid out as Hugging Face's rotate_half
    expects, already multiplied by the scaling's attention factor (yarn)."""
    freqs_BxLxH2 = positions_BxL.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq(cfg))
    emb = jnp.concatenate([freqs_BxLxH2, freqs_BxLxH2], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    scale = attention_scaling(cfg)
    if scale != 1.0:
        cos, sin = cos * _F32(scale), sin * _F32(scale)
    return cos, sin


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate x [..., head_dim]; cos/sin broadcast against x."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)
