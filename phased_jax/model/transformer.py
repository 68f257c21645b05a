"""One Flax decoder for Llama-2 and Mistral: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Parameters carry logical axis names only (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`,
`vocab`, `layers`); the mesh rules that map them to devices live in `phased_jax.sharding`.

Attention is masked by one rule for every use: a query may see a key of the same non-zero
segment, at an earlier or equal position, inside the sliding window. Padding is segment 0,
packed examples are segments 1, 2, ..., and a KV cache's unwritten slots are segment 0.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from phased_jax.model.config import ModelConfig

Array = jax.Array


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str | None, ...],
           init: Any, dtype: Any) -> Array:
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for decoding, plus what the mask needs to know of each slot.

    k and v keep kv_heads before slots, the layout attention reads them in, so a decode step
    neither transposes nor copies them: the layer scan carries both whole and each layer writes
    only its own slice at the current slot (`lax.dynamic_update_slice`, done in place by XLA).
    """

    k: Array | tuple[Array, ...]  # [layers, batch, kv_heads, slots, head_dim], or per layer
    v: Array | tuple[Array, ...]  # same as k
    positions: Array  # [batch, slots] int32
    segment_ids: Array  # [batch, slots] int32, 0 where nothing is written yet
    index: Array  # scalar int32: the next slot to write

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, slots: int, dtype: Any = None,
              per_layer: bool = False) -> KVCache:
        """per_layer: k and v as tuples of [batch, kv_heads, slots, head_dim], one a layer, for
        params from `unstack_layers`; attention then reads each layer's cache where it lies
        instead of slicing it out of the stack (a copy on XLA's CPU backend, every step)."""
        dtype = jnp.dtype(dtype or cfg.dtype)
        shape = (batch, cfg.num_kv_heads, slots, cfg.head_dim)
        if per_layer:
            k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
            v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        else:
            k = v = jnp.zeros((cfg.num_layers, *shape), dtype)
        return cls(
            k=k, v=v,
            positions=jnp.zeros((batch, slots), jnp.int32),
            segment_ids=jnp.zeros((batch, slots), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )


def unstack_layers(params: Any) -> dict:
    """params with the stacked `layers` split into a tuple of per-layer trees, for decoding.

    `Transformer` decodes with such params layer by layer (unrolled) instead of by the layer
    scan, which slices each layer's weights out of the stack, a copy on XLA's CPU backend, at
    every step. Outside `jit`, a stack held whole in one CPU device's memory is split into
    views of it, without a copy (fresh copies of every layer cost more than 0.1 s for a 58M
    model, mostly in page faults); otherwise the split copies the weights once (so they are held
    twice while it lives). Only for `apply` with a per-layer cache
    (`KVCache.empty(per_layer=True)`); training and `init` need the stacked params.
    """
    stacked = nn.meta.unbox(params["layers"])
    leaves, treedef = jax.tree.flatten(stacked)
    n = leaves[0].shape[0]
    split = [_layer_views(a) or tuple(a[i] for i in range(n)) for a in leaves]
    layers = tuple(jax.tree.unflatten(treedef, [s[i] for s in split]) for i in range(n))
    return {**params, "layers": layers}


def _layer_views(a: Any) -> tuple[Array, ...] | None:
    """Arrays over each a[i]'s memory, if `a` is a concrete array on one CPU device, else None.

    `device_put` of a host view aliases it on the CPU backend (a copy where it cannot, e.g. for
    misaligned memory); the views keep `a`'s buffer alive.
    """
    if (isinstance(a, jax.core.Tracer) or not isinstance(a, jax.Array)
            or len(a.devices()) != 1 or next(iter(a.devices())).platform != "cpu"):
        return None
    host = np.asarray(a)  # a view of the device buffer on the CPU backend
    return tuple(jax.device_put(host[i], a.sharding) for i in range(a.shape[0]))


def attention_mask(q_pos_BxL: Array, q_seg_BxL: Array, k_pos_BxS: Array, k_seg_BxS: Array,
                   sliding_window: int) -> Array:
    """Boolean [batch, L, S]: may query l attend to key s."""
    same_seg = (q_seg_BxL[:, :, None] == k_seg_BxS[:, None, :]) & (k_seg_BxS[:, None, :] != 0)
    delta = q_pos_BxL[:, :, None] - k_pos_BxS[:, None, :]
    allowed = same_seg & (delta >= 0)
    if sliding_window:
        allowed &= delta < sliding_window
    return allowed


def rope_tables(positions_BxL: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos and sin [batch, L, head_dim] in float32, laid out as Hugging Face's rotate_half expects."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs_BxLxH2 = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs_BxLxH2, freqs_BxLxH2], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate x [..., head_dim]; cos/sin broadcast against x."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x_BxLxD: Array) -> Array:
        scale_D = _param(self, "scale", (x_BxLxD.shape[-1],), ("embed",), nn.initializers.ones,
                         self.param_dtype)
        x32 = x_BxLxD.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale_D.astype(self.dtype) * normed.astype(self.dtype)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: Array, cos: Array, sin: Array, mask_BxLxS: Array,
                 kv: tuple[Array, Array, Array] | None, cache_index: Array | None
                 ) -> tuple[Array, tuple[Array, Array] | None]:
        """`kv`, when decoding: every layer's cache k and v [layers, B, K, S, H] and this layer's
        index; the result then carries them back with this step's keys and values written."""
        cfg = self.cfg
        dtype, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        K, G, H, D = cfg.num_kv_heads, cfg.group_size, cfg.head_dim, cfg.hidden_size
        init = nn.initializers.normal(cfg.initializer_range)
        # Fused projection: per kv head, its G query heads, then its key, then its value.
        w_qkv = _param(self, "qkv", (D, K, G + 2, H), ("embed", "kv_heads", None, "head_dim"),
                       init, pdt)
        w_o = _param(self, "o", (K, G, H, D), ("kv_heads", None, "head_dim", "embed"), init, pdt)

        qkv = jnp.einsum("bld,dkgh->blkgh", x_BxLxD, w_qkv.astype(dtype))
        qkv = checkpoint_name(qkv, "qkv_proj")
        q_BxLxKxGxH = apply_rope(qkv[..., :G, :], cos[:, :, None, None, :], sin[:, :, None, None, :])
        k_BxLxKxH = apply_rope(qkv[..., G, :], cos[:, :, None, :], sin[:, :, None, :])
        v_BxLxKxH = qkv[..., G + 1, :]
        q_BxLxKxGxH = nn.with_logical_constraint(
            q_BxLxKxGxH, ("batch", "length", "act_kv_heads", None, "head_dim"))

        B, L = x_BxLxD.shape[:2]
        new_kv = None
        if kv is not None:  # decoding: write this step's keys and values into the cache
            k_all, v_all, layer = kv
            k_new = k_BxLxKxH.swapaxes(1, 2).astype(k_all.dtype)
            v_new = v_BxLxKxH.swapaxes(1, 2).astype(v_all.dtype)
            if layer is None:  # this layer's own cache [B, K, S, H]: read in place, no slice
                at = (0, 0, cache_index, 0)
                k_all = jax.lax.dynamic_update_slice(k_all, k_new, at)
                v_all = jax.lax.dynamic_update_slice(v_all, v_new, at)
                k_BxKxSxH, v_BxKxSxH = k_all.astype(dtype), v_all.astype(dtype)
            else:
                at = (layer, 0, 0, cache_index, 0)
                k_all = jax.lax.dynamic_update_slice(k_all, k_new[None], at)
                v_all = jax.lax.dynamic_update_slice(v_all, v_new[None], at)
                k_BxKxSxH = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False
                                                         ).astype(dtype)
                v_BxKxSxH = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False
                                                         ).astype(dtype)
            new_kv = (k_all, v_all)
            if cfg.attention_impl == "dot_product_attention":
                out = jax.nn.dot_product_attention(
                    q_BxLxKxGxH.reshape(B, L, K * G, H), k_BxKxSxH.swapaxes(1, 2),
                    v_BxKxSxH.swapaxes(1, 2), mask=mask_BxLxS[:, None], implementation="xla")
                out_BxLxKxGxH = out.reshape(B, L, K, G, H)
            else:  # the cache's own layout: no transpose of the cache
                scores = jnp.einsum("blkgh,bksh->bkgls", q_BxLxKxGxH, k_BxKxSxH) * (H ** -0.5)
                scores = jnp.where(mask_BxLxS[:, None, None], scores.astype(jnp.float32),
                                   jnp.finfo(jnp.float32).min)
                probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
                out_BxLxKxGxH = jnp.einsum("bkgls,bksh->blkgh", probs, v_BxKxSxH)
        elif cfg.attention_impl == "dot_product_attention":
            out = jax.nn.dot_product_attention(
                q_BxLxKxGxH.reshape(B, L, K * G, H), k_BxLxKxH, v_BxLxKxH,
                mask=mask_BxLxS[:, None], implementation="xla")
            out_BxLxKxGxH = out.reshape(B, L, K, G, H)
        else:
            scores = jnp.einsum("blkgh,bskh->bkgls", q_BxLxKxGxH, k_BxLxKxH) * (H ** -0.5)
            scores = jnp.where(mask_BxLxS[:, None, None], scores.astype(jnp.float32),
                               jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
            out_BxLxKxGxH = jnp.einsum("bkgls,bskh->blkgh", probs, v_BxLxKxH)
        if kv is None:
            out_BxLxD = jnp.einsum("blkgh,kghd->bld", out_BxLxKxGxH, w_o.astype(dtype))
        else:  # one plain matmul: the 4-d einsum has XLA CPU transpose w_o at every step
            out_BxLxD = (out_BxLxKxGxH.reshape(B, L, K * G * H)
                         @ w_o.reshape(K * G * H, D).astype(dtype))
        return checkpoint_name(out_BxLxD, "out_proj"), new_kv


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: Array) -> Array:
        cfg = self.cfg
        dtype, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        init = nn.initializers.normal(cfg.initializer_range)
        D, F = cfg.hidden_size, cfg.intermediate_size
        w_in = _param(self, "wi", (D, 2, F), ("embed", None, "mlp"), init, pdt)  # gate, up
        w_out = _param(self, "wo", (F, D), ("mlp", "embed"), init, pdt)
        h_BxLx2xF = jnp.einsum("bld,dcf->blcf", x_BxLxD, w_in.astype(dtype))
        h_BxLxF = jax.nn.silu(h_BxLx2xF[..., 0, :]) * h_BxLx2xF[..., 1, :]
        h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("batch", "length", "act_mlp"))
        return jnp.einsum("blf,fd->bld", h_BxLxF, w_out.astype(dtype))


class DecoderLayer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry: Any, cos: Array, sin: Array, mask_BxLxS: Array,
                 cache_index: Array | None, layer: Array | None):
        """carry: x [B, L, D], or when decoding (x, k, v) with every layer's cache k and v,
        `layer` being this layer's index into them, or with this layer's own k and v when
        `layer` is None. Returns (carry, None) for the layer scan."""
        cfg = self.cfg
        if cache_index is None:
            x_BxLxD, kv = carry, None
        else:
            x_BxLxD, k_all, v_all = carry
            kv = (k_all, v_all, layer)
        dtype, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "act_embed"))
        h = RMSNorm(cfg.rms_norm_eps, dtype, pdt, name="attn_norm")(x_BxLxD)
        attn_out, new_kv = Attention(cfg, name="attn")(h, cos, sin, mask_BxLxS, kv, cache_index)
        x_BxLxD = x_BxLxD + attn_out
        h = RMSNorm(cfg.rms_norm_eps, dtype, pdt, name="mlp_norm")(x_BxLxD)
        x_BxLxD = x_BxLxD + MLP(cfg, name="mlp")(h)
        return (x_BxLxD if new_kv is None else (x_BxLxD, *new_kv)), None


def _remat_policy(name: str):
    policies = jax.checkpoint_policies
    return {
        "full": policies.nothing_saveable,
        "dots": policies.checkpoint_dots,
        "dots_no_batch": policies.dots_with_no_batch_dims_saveable,
        "qkv_proj": policies.save_only_these_names("qkv_proj", "out_proj"),
    }[name]


class Transformer(nn.Module):
    """Decoder-only LM. `__call__` returns logits [batch, L, vocab] (and the new cache if given one)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, input_ids_BxL: Array, positions_BxL: Array | None = None,
                 segment_ids_BxL: Array | None = None, attention_mask_BxL: Array | None = None,
                 cache: KVCache | None = None, last_only: bool = False):
        """last_only: logits of the last position only, [batch, 1, vocab] (a prefill needs no
        others, and the LM head over every prompt position is a large share of its work)."""
        cfg = self.cfg
        dtype, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        B, L = input_ids_BxL.shape
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        if segment_ids_BxL is None:
            segment_ids_BxL = (jnp.ones((B, L), jnp.int32) if attention_mask_BxL is None
                               else attention_mask_BxL.astype(jnp.int32))

        table_VxD = _param(self, "embed", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                           nn.initializers.normal(cfg.initializer_range), pdt)
        x_BxLxD = jnp.take(table_VxD, input_ids_BxL, axis=0).astype(dtype)
        cos, sin = rope_tables(positions_BxL, cfg.head_dim, cfg.rope_theta)

        if cache is None:
            k_pos, k_seg, cache_index = positions_BxL, segment_ids_BxL, None
        else:
            k_pos = jax.lax.dynamic_update_slice(cache.positions, positions_BxL.astype(jnp.int32),
                                                 (0, cache.index))
            k_seg = jax.lax.dynamic_update_slice(cache.segment_ids,
                                                 segment_ids_BxL.astype(jnp.int32), (0, cache.index))
            cache_index = cache.index
        mask_BxLxS = attention_mask(positions_BxL, segment_ids_BxL, k_pos, k_seg, cfg.sliding_window)

        layer_cls = DecoderLayer
        if cfg.remat_policy != "none":
            layer_cls = nn.remat(layer_cls, policy=_remat_policy(cfg.remat_policy), prevent_cse=False)
        layers = nn.scan(
            layer_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            # the layer index is scanned when decoding: the whole cache rides in the carry
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast,
                     nn.broadcast if cache is None else 0),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, name="layers")
        if cache is None:
            x_BxLxD, _ = layers(x_BxLxD, cos, sin, mask_BxLxS, None, None)
        elif isinstance(self.variables.get("params", {}).get("layers"), (tuple, list)):
            # params from `unstack_layers`: one layer after another, each on its own weights
            # and its own cache arrays
            if not isinstance(cache.k, tuple):
                raise ValueError("params from unstack_layers decode with "
                                 "KVCache.empty(..., per_layer=True)")
            new_k, new_v = [], []
            for p_i, k_i, v_i in zip(self.variables["params"]["layers"], cache.k, cache.v,
                                     strict=True):
                (x_BxLxD, k_i, v_i), _ = DecoderLayer(cfg, parent=None).apply(
                    {"params": p_i}, (x_BxLxD, k_i, v_i), cos, sin, mask_BxLxS, cache_index, None)
                new_k.append(k_i)
                new_v.append(v_i)
            new_k, new_v = tuple(new_k), tuple(new_v)
        else:
            (x_BxLxD, new_k, new_v), _ = layers(
                (x_BxLxD, cache.k, cache.v), cos, sin, mask_BxLxS, cache_index,
                jnp.arange(cfg.num_layers, dtype=jnp.int32))

        if last_only:
            x_BxLxD = x_BxLxD[:, -1:]
        x_BxLxD = RMSNorm(cfg.rms_norm_eps, dtype, pdt, name="final_norm")(x_BxLxD)
        head_DxV = _param(self, "lm_head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                          nn.initializers.normal(cfg.initializer_range), pdt)
        logits_BxLxV = jnp.einsum("bld,dv->blv", x_BxLxD, head_DxV.astype(dtype))
        logits_BxLxV = nn.with_logical_constraint(logits_BxLxV, ("batch", "length", "act_vocab"))
        if cache is None:
            return logits_BxLxV
        new_cache = KVCache(k=new_k, v=new_v, positions=k_pos, segment_ids=k_seg,
                            index=cache.index + L)
        return logits_BxLxV, new_cache
