"""Attention: one mask rule and one function, computed by the implementation a config names.

The mask rule serves every use: a query may see a key of the same non-zero segment, at an
earlier or equal position, inside the sliding window. Padding is segment 0, packed examples are
segments 1, 2, ..., and a KV cache's unwritten slots are segment 0.

A `Mask` carries the rule in the form its implementation reads: the dense [B, L, S] boolean
mask (`xla`, `dot_product_attention`, and every KV-cache attention), or, for self-attention
without a cache, the segment ids alone (`splash`, `cudnn`). The segment form assumes what the
data pipeline writes: each segment is one contiguous run whose positions count 0, 1, ... from
its start, so "earlier position, same segment" is "earlier index, same segment".

Implementations (`ModelConfig.attention_impl`, one of `config.ATTENTION_IMPLS`):
- `xla`: einsums and a float32 softmax over the grouped query heads; the reference, matching
  Hugging Face's eager attention.
- `dot_product_attention`: `jax.nn.dot_product_attention`'s XLA path over the flattened query
  heads; unlike `xla` it accumulates bfloat16 scores in float32.
- `splash` (TPU): the Pallas splash-attention kernel in its grouped-query form, causal by
  index with the segment ids and, for Mistral, a local window. Mosaic kernels are not
  auto-partitioned, so it runs under `jax.shard_map` over the mesh axes the logical rules give
  `batch` and `act_kv_heads`. Off TPU it runs in Pallas interpret mode (tests). Block sizes:
  `attention_block_q` / `attention_block_kv`.
- `cudnn` (GPU, bfloat16/float16): cuDNN flash attention through `jax.nn.dot_product_attention`,
  the mask given as causal + per-row lengths (right padding) + a left window. It cannot express
  several segments in a row, so packed data must use another implementation
  (`resolve_attention_impl`; `config_checks` refuses `cudnn` with `data.packing`).
- `auto`: `splash` on TPU, `cudnn` on GPU (where it applies), `xla` elsewhere.

The platform is the one the step is compiled for, never `jax.default_backend()` alone (that is
`cpu` when compiling for a TPU topology from a CPU host): the `Trainer` resolves `auto` from its
mesh's devices; at trace time `mesh_platform()` reads the mesh in context (`jax.set_mesh`; its
abstract mesh names the device platform, even inside `jit`), falling back to the default
backend only when there is no mesh; splash interprets unless that platform is `tpu`. Each
implementation is one entry of `_IMPLEMENTATIONS`, reached only through `attend`.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from phased_jax.errors import ConfigError
from phased_jax.model.config import ATTENTION_BLOCK_MULTIPLE as LANES

Array = jax.Array
log = logging.getLogger(__name__)

SEGMENT_IMPLS = ("splash", "cudnn")  # read `Mask.segment_ids_BxL`, self-attention only
_HALF_DTYPES = ("bfloat16", "float16")  # the dtypes cuDNN's flash attention takes


@struct.dataclass
class Mask:
    """Which keys each query may see, in the form `implementation` reads (module docstring)."""

    dense_BxLxS: Array | None = None
    segment_ids_BxL: Array | None = None
    implementation: str = struct.field(pytree_node=False, default="xla")
    sliding_window: int = struct.field(pytree_node=False, default=0)
    block_q: int = struct.field(pytree_node=False, default=LANES)  # splash's block sizes
    block_kv: int = struct.field(pytree_node=False, default=LANES)


def attention_mask(q_pos_BxL: Array, q_seg_BxL: Array, k_pos_BxS: Array, k_seg_BxS: Array,
                   sliding_window: int) -> Array:
    """Boolean [batch, L, S]: may query l attend to key s."""
    same_seg = (q_seg_BxL[:, :, None] == k_seg_BxS[:, None, :]) & (k_seg_BxS[:, None, :] != 0)
    delta = q_pos_BxL[:, :, None] - k_pos_BxS[:, None, :]
    allowed = same_seg & (delta >= 0)
    if sliding_window:
        allowed &= delta < sliding_window
    return allowed


def make_mask(q_pos_BxL: Array, q_seg_BxL: Array, k_pos_BxS: Array, k_seg_BxS: Array, *,
              sliding_window: int, implementation: str, self_attention: bool,
              block_q: int = LANES, block_kv: int = LANES) -> Mask:
    """The `Mask` for `implementation`; attention over a cache (`self_attention=False`) always
    takes the dense form, computed by `xla` where the implementation reads segment ids."""
    common = dict(sliding_window=sliding_window, block_q=block_q, block_kv=block_kv)
    if implementation in SEGMENT_IMPLS:
        if self_attention:
            return Mask(segment_ids_BxL=q_seg_BxL, implementation=implementation, **common)
        implementation = "xla"
    dense = attention_mask(q_pos_BxL, q_seg_BxL, k_pos_BxS, k_seg_BxS, sliding_window)
    return Mask(dense_BxLxS=dense, implementation=implementation, **common)


def attend(q_BxLxKxGxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask: Mask) -> Array:
    """Each query's softmax-weighted values, [batch, L, kv_heads, group, head_dim].

    Query heads come grouped by the kv head they share (G = num_heads // num_kv_heads).
    """
    return _IMPLEMENTATIONS[mask.implementation](q_BxLxKxGxH, k_BxSxKxH, v_BxSxKxH, mask)


# -- choosing an implementation -------------------------------------------------------------------

def mesh_platform() -> str:
    """The platform the current computation is for: the context mesh's devices (set by
    `jax.set_mesh`, readable inside `jit`), else the default backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def resolve_attention_impl(impl: str, platform: str, *, packing: bool = False,
                           dtype: str = "bfloat16", strict: bool = True) -> str:
    """The implementation `impl` (a config's `model.attention_impl`) means on `platform`.

    `auto` picks the platform's kernel where it applies and says why when it does not.
    An explicit kernel the platform cannot run is a ConfigError when `strict` (a training run
    asked for it), else `xla` with a warning (a saved config read on other hardware).
    """
    gpu_ok = platform in ("gpu", "cuda")  # jax names an NVIDIA device's platform "gpu"
    why_not_cudnn = ("it needs a GPU" if not gpu_ok
                     else "it cannot express packed segments (data.packing)" if packing
                     else f"it needs bfloat16 or float16 (model.dtype={dtype!r})"
                     if dtype not in _HALF_DTYPES else "")
    if impl == "auto":
        if platform == "tpu":
            return "splash"
        if gpu_ok and why_not_cudnn:
            log.info("model.attention_impl='auto' uses xla, not cudnn: %s", why_not_cudnn)
        return "cudnn" if gpu_ok and not why_not_cudnn else "xla"
    problem = ""
    if impl == "cudnn" and why_not_cudnn:
        problem = f"model.attention_impl='cudnn' cannot be used here: {why_not_cudnn}"
    elif impl == "splash" and gpu_ok:
        problem = "model.attention_impl='splash' is a TPU kernel; on GPU use 'cudnn' or 'auto'"
    if not problem:
        return impl
    if strict:
        raise ConfigError(f"{problem}; set model.attention_impl='auto' or 'xla'")
    log.warning("%s (platform %s): using xla", problem, platform)
    return "xla"


# -- implementations ------------------------------------------------------------------------------

def _xla(q_BxLxKxGxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask: Mask) -> Array:
    H = q_BxLxKxGxH.shape[-1]
    scores = jnp.einsum("blkgh,bskh->bkgls", q_BxLxKxGxH, k_BxSxKxH) * (H ** -0.5)
    scores = jnp.where(mask.dense_BxLxS[:, None, None], scores.astype(jnp.float32),
                       jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q_BxLxKxGxH.dtype)
    return jnp.einsum("bkgls,bskh->blkgh", probs, v_BxSxKxH)


def _dot_product_attention(q_BxLxKxGxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array,
                           mask: Mask) -> Array:
    B, L, K, G, H = q_BxLxKxGxH.shape
    out_BxLxNxH = jax.nn.dot_product_attention(
        q_BxLxKxGxH.reshape(B, L, K * G, H), k_BxSxKxH, v_BxSxKxH,
        mask=mask.dense_BxLxS[:, None], implementation="xla")
    return out_BxLxNxH.reshape(B, L, K, G, H)


def cudnn_arguments(mask: Mask) -> dict:
    """The mask as `jax.nn.dot_product_attention` takes it for cuDNN: causal, each row's key
    length (its non-padding tokens, padding on the right) and a left window. Exact only for
    rows of one segment followed by padding: packed rows (segments 2, 3, ...) cannot be said.

    Queries are not length-masked and an all-padding row keeps one key, so every query sees
    some key: a pad query's output is arbitrary but finite (no NaN to leak into gradients)."""
    lengths_B = jnp.sum(mask.segment_ids_BxL != 0, axis=-1, dtype=jnp.int32)
    window = (mask.sliding_window - 1, 0) if mask.sliding_window else None
    return dict(is_causal=True, key_value_seq_lengths=jnp.maximum(lengths_B, 1),
                local_window_size=window)


def _cudnn(q_BxLxKxGxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask: Mask,
           implementation: str = "cudnn") -> Array:
    B, L, K, G, H = q_BxLxKxGxH.shape
    out_BxLxNxH = jax.nn.dot_product_attention(
        q_BxLxKxGxH.reshape(B, L, K * G, H), k_BxSxKxH, v_BxSxKxH,
        implementation=implementation, **cudnn_arguments(mask))
    return out_BxLxNxH.reshape(B, L, K, G, H)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _splash(q_BxLxKxGxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask: Mask) -> Array:
    B, L, K, G, H = q_BxLxKxGxH.shape
    # A block longer than the (lane-rounded) sequence is cut to it; the sequence is padded to
    # whole blocks with segment 0, which no real query sees.
    bq, bkv = (min(b, _round_up(L, LANES)) for b in (mask.block_q, mask.block_kv))
    Lp = _round_up(L, math.lcm(bq, bkv))
    seg_BxL = mask.segment_ids_BxL.astype(jnp.int32)
    q, k, v = q_BxLxKxGxH * jnp.asarray(H ** -0.5, q_BxLxKxGxH.dtype), k_BxSxKxH, v_BxSxKxH
    if Lp != L:
        pad = lambda x: jnp.pad(x, [(0, 0), (0, Lp - L)] + [(0, 0)] * (x.ndim - 2))
        q, k, v, seg_BxL = pad(q), pad(k), pad(v), pad(seg_BxL)
    kernel = functools.partial(_splash_shard, sliding_window=mask.sliding_window,
                               block_q=bq, block_kv=bkv, interpret=mesh_platform() != "tpu")
    out = _shard_over_batch_and_heads(kernel, q, k, v, seg_BxL)
    return out[:, :L]


def _splash_shard(q_BxLxKxGxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, seg_BxL: Array, *,
                  sliding_window: int, block_q: int, block_kv: int, interpret: bool) -> Array:
    """Splash attention on one device's rows and kv heads: the kernel's grouped-query form
    (query head n reads kv head n // G, as flattening [K, G] lays them out), vmapped over rows."""
    B, L, K, G, H = q_BxLxKxGxH.shape
    if sliding_window and sliding_window < L:
        base = splash.LocalMask((L, L), window_size=(sliding_window - 1, 0), offset=0)
    else:
        base = splash.CausalMask((L, L))
    blocks = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                               block_q_dkv=block_q, block_kv_dkv=block_kv,
                               block_kv_dkv_compute=block_kv, block_q_dq=block_q,
                               block_kv_dq=block_kv)
    kernel = splash.make_splash_mha(splash.MultiHeadMask([base] * (K * G)), block_sizes=blocks,
                                    head_shards=1, q_seq_shards=1, interpret=interpret)
    q_BxNxLxH = q_BxLxKxGxH.reshape(B, L, K * G, H).transpose(0, 2, 1, 3)
    out_BxNxLxH = jax.vmap(kernel)(q_BxNxLxH, k_BxSxKxH.transpose(0, 2, 1, 3),
                                   v_BxSxKxH.transpose(0, 2, 1, 3),
                                   splash.SegmentIds(seg_BxL, seg_BxL))
    return out_BxNxLxH.transpose(0, 2, 1, 3).reshape(B, L, K, G, H)


def _mesh_axes(logical: str, dim: int, sizes: dict[str, int], taken: set[str]) -> tuple[str, ...]:
    """The mesh axes the logical rules give `logical`, if they divide `dim` (else none)."""
    axes = nn.logical_to_mesh_axes((logical,))[0]
    names = tuple(n for n in ((axes,) if isinstance(axes, str) else tuple(axes or ()))
                  if sizes.get(n, 1) > 1 and n not in taken)
    return names if names and dim % math.prod(sizes[n] for n in names) == 0 else ()


def _shard_over_batch_and_heads(fn: Callable[..., Array], q_BxLxKxGxH: Array, k_BxSxKxH: Array,
                                v_BxSxKxH: Array, seg_BxL: Array) -> Array:
    """`fn` under `jax.shard_map`, each device given its rows and kv heads (the mesh axes the
    rules in effect give `batch` and `act_kv_heads`); called directly when there is no mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(q_BxLxKxGxH, k_BxSxKxH, v_BxSxKxH, seg_BxL)
    sizes = dict(mesh.shape)
    batch = _mesh_axes("batch", q_BxLxKxGxH.shape[0], sizes, set())
    heads = _mesh_axes("act_kv_heads", q_BxLxKxGxH.shape[2], sizes, set(batch))
    b, h = batch or None, heads or None
    q_spec, kv_spec = PartitionSpec(b, None, h, None, None), PartitionSpec(b, None, h, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(b, None)),
                         out_specs=q_spec, check_vma=False)(q_BxLxKxGxH, k_BxSxKxH, v_BxSxKxH,
                                                            seg_BxL)


_IMPLEMENTATIONS: dict[str, Callable[[Array, Array, Array, Mask], Array]] = {
    "xla": _xla,
    "dot_product_attention": _dot_product_attention,
    "splash": _splash,
    "cudnn": _cudnn,
}
