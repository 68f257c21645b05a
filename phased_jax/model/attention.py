"""Attention: one mask rule and one function, computed by the implementation a config names.

The mask rule serves every use: a query may see a key of the same non-zero segment, at an
earlier or equal position, inside the sliding window. Padding is segment 0, packed examples are
segments 1, 2, ..., and a KV cache's unwritten slots are segment 0.

Implementations (`ModelConfig.attention_impl`, one of `config.ATTENTION_IMPLS`):
- `xla`: einsums and a float32 softmax over the grouped query heads; the reference, matching
  Hugging Face's eager attention.
- `dot_product_attention`: `jax.nn.dot_product_attention`'s XLA path over the flattened query
  heads; unlike `xla` it accumulates bfloat16 scores in float32. Its other implementations
  (cudnn) are where platform kernels come in.
Each is one entry of `_IMPLEMENTATIONS`, reached only through `attend`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def attention_mask(q_pos_BxL: Array, q_seg_BxL: Array, k_pos_BxS: Array, k_seg_BxS: Array,
                   sliding_window: int) -> Array:
    """Boolean [batch, L, S]: may query l attend to key s."""
    same_seg = (q_seg_BxL[:, :, None] == k_seg_BxS[:, None, :]) & (k_seg_BxS[:, None, :] != 0)
    delta = q_pos_BxL[:, :, None] - k_pos_BxS[:, None, :]
    allowed = same_seg & (delta >= 0)
    if sliding_window:
        allowed &= delta < sliding_window
    return allowed


def attend(q_BxLxKxGxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask_BxLxS: Array,
           implementation: str = "xla") -> Array:
    """Each query's softmax-weighted values, [batch, L, kv_heads, group, head_dim].

    Query heads come grouped by the kv head they share (G = num_heads // num_kv_heads).
    """
    return _IMPLEMENTATIONS[implementation](q_BxLxKxGxH, k_BxSxKxH, v_BxSxKxH, mask_BxLxS)


def _xla(q_BxLxKxGxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask_BxLxS: Array) -> Array:
    H = q_BxLxKxGxH.shape[-1]
    scores = jnp.einsum("blkgh,bskh->bkgls", q_BxLxKxGxH, k_BxSxKxH) * (H ** -0.5)
    scores = jnp.where(mask_BxLxS[:, None, None], scores.astype(jnp.float32),
                       jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q_BxLxKxGxH.dtype)
    return jnp.einsum("bkgls,bskh->blkgh", probs, v_BxSxKxH)


def _dot_product_attention(q_BxLxKxGxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array,
                           mask_BxLxS: Array) -> Array:
    B, L, K, G, H = q_BxLxKxGxH.shape
    out_BxLxNxH = jax.nn.dot_product_attention(
        q_BxLxKxGxH.reshape(B, L, K * G, H), k_BxSxKxH, v_BxSxKxH,
        mask=mask_BxLxS[:, None], implementation="xla")
    return out_BxLxNxH.reshape(B, L, K, G, H)


_IMPLEMENTATIONS: dict[str, Callable[[Array, Array, Array, Array], Array]] = {
    "xla": _xla,
    "dot_product_attention": _dot_product_attention,
}
