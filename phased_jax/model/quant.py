"""A frozen base stored quantised (QLoRA): int8 or NF4 codes with a float32 absmax per block.

Each of a layer's four projections (`qkv`, `o`, `wi`, `wo`) is cut into blocks of `BLOCK`
consecutive values (fewer, down to `MIN_BLOCK`, where the axis is not a multiple of it: small
models such as `tiny-llama`'s MLP of 176) along one axis (`BLOCK_AXIS`: the hidden size for `qkv`, `o` and `wi`, the
MLP's width for `wo`), each block scaled by its largest magnitude, as bitsandbytes' blockwise
quantisation does (without its second quantisation of the scales). int8 rounds value/absmax
x 127; NF4 (Dettmers et al., 2023) takes the nearest of 16 normal-quantile levels, two codes to
a byte along the block axis. The model dequantises one layer's weights just before their
matmul, inside the layer scan, so only that layer is ever in memory in full.

`quantize` works on numpy (a base read from disk, one layer at a time, on the host) and on jax
arrays alike, with the same result: both round the same float32 values.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 64
MIN_BLOCK = 16
QUANTISED = ("qkv", "o", "wi", "wo")  # the layer projections a quantised base stores so
# their block axis, counting the stacked layer axis of the params tree as axis 0
BLOCK_AXIS = {"qkv": 1, "o": 4, "wi": 1, "wo": 1}
# NormalFloat4's 16 levels, as bitsandbytes tabulates them
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)
# a value nearer level i+1 than level i is above their midpoint
_NF4_MIDPOINTS = ((NF4[1:] + NF4[:-1]) / 2).astype(np.float32)


def code_shape(shape: tuple[int, ...], qtype: str, axis: int) -> tuple[int, ...]:
    """The codes' shape: the weight's, the block axis halved for nf4 (two codes a byte)."""
    return tuple(d // 2 if (i == axis and qtype == "nf4") else d for i, d in enumerate(shape))


def block_size(size: int) -> int:
    """The block along an axis of `size` values: `BLOCK`, or the largest power of two under it
    that divides the axis (the codes' and scales' shapes then say which)."""
    return math.gcd(size, BLOCK)


def absmax_shape(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    return tuple(d // block_size(d) if i == axis else d for i, d in enumerate(shape))


def code_dtype(qtype: str) -> Any:
    return {"int8": jnp.int8, "nf4": jnp.uint8}[qtype]


def bytes_per_weight(qtype: str) -> float:
    """Stored bytes per weight of a quantised projection: its code and its share of the
    block's float32 absmax."""
    return {"int8": 1.0, "nf4": 0.5}[qtype] + 4 / BLOCK


def check_divisible(name: str, size: int, qtype: str) -> str | None:
    """Why a weight whose block axis has `size` values cannot be quantised (or None)."""
    if block_size(size) < MIN_BLOCK:
        return (f"model.lora.base_qtype={qtype!r} quantises blocks of {MIN_BLOCK}-{BLOCK} values "
                f"along {name}, whose size {size} is not a multiple of {MIN_BLOCK}")
    return None


def _blocks(x: Any, axis: int) -> Any:
    """x with the block axis split in two: [..., n / block, block, ...]."""
    shape, block = x.shape, block_size(x.shape[axis])
    return x.reshape(shape[:axis] + (shape[axis] // block, block) + shape[axis + 1:])


def quantize(w: Any, qtype: str, axis: int) -> tuple[Any, Any]:
    """(codes, absmax) of weight `w` (numpy in, numpy out; jax in, jax out)."""
    xp = np if isinstance(w, np.ndarray) else jnp
    x = _blocks(w.astype(np.float32), axis)
    absmax = xp.max(xp.abs(x), axis=axis + 1, keepdims=True)
    safe = xp.where(absmax == 0, np.float32(1), absmax)
    normed = x / safe
    if qtype == "int8":
        codes = xp.clip(xp.round(normed * np.float32(127)), -127, 127).astype(np.int8)
        codes = codes.reshape(w.shape)
    else:
        idx = xp.searchsorted(xp.asarray(_NF4_MIDPOINTS), normed.reshape(-1), side="left")
        codes = idx.astype(np.uint8).reshape(w.shape)
        pairs = _pairs(codes, axis)
        codes = (pairs[0] | (pairs[1] << 4)).astype(np.uint8)
    return codes, xp.squeeze(absmax, axis + 1).astype(np.float32)


def _pairs(codes: Any, axis: int) -> tuple[Any, Any]:
    """The even and the odd positions along `axis` (NF4 packs each pair into one byte)."""
    shape = codes.shape
    split = codes.reshape(shape[:axis] + (shape[axis] // 2, 2) + shape[axis + 1:])
    index = [slice(None)] * split.ndim
    index[axis + 1] = 0
    even = split[tuple(index)]
    index[axis + 1] = 1
    return even, split[tuple(index)]


def dequantize(codes: jax.Array, absmax: jax.Array, qtype: str, axis: int, dtype: Any
               ) -> jax.Array:
    """The weight, in `dtype`, that `quantize` stored (jax; fused into the consumer's matmul)."""
    if qtype == "int8":
        normed = codes.astype(jnp.float32) / jnp.float32(127)
    else:
        low, high = codes & 15, codes >> 4
        both = jnp.stack([low, high], axis=axis + 1)
        shape = codes.shape
        both = both.reshape(shape[:axis] + (shape[axis] * 2,) + shape[axis + 1:])
        normed = jnp.asarray(NF4)[both.astype(jnp.int32)]
    w = _blocks(normed, axis) * jnp.expand_dims(absmax, axis + 1)
    return w.reshape(normed.shape).astype(dtype)


def error_bound(qtype: str) -> float:
    """The largest |w - dequantize(quantize(w))| relative to its block's absmax: half int8's
    step, or half NF4's widest gap between levels."""
    if qtype == "int8":
        return 0.5 / 127
    return float(np.max(np.diff(NF4)) / 2)


def quantize_tree(base: dict, qtype: str) -> dict:
    """A base params tree with its layer projections quantised (`<name>_q`, `<name>_absmax`
    beside the module's other params); jax or numpy leaves."""
    layers = {m: dict(v) for m, v in base["layers"].items()}
    for module in ("attn", "mlp"):
        for name in list(layers[module]):
            if name in QUANTISED:
                codes, absmax = quantize(layers[module].pop(name), qtype, BLOCK_AXIS[name])
                layers[module][f"{name}_q"], layers[module][f"{name}_absmax"] = codes, absmax
    return {**base, "layers": layers}
