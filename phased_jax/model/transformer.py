"""One Flax decoder for Llama-2 and Mistral: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Parameters carry logical axis names only (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`,
`vocab`, `layers`); the mesh rules that map them to devices live in `phased_jax.sharding`.
Attention and its mask rule are in `phased_jax.model.attention`, RoPE in `phased_jax.model.rope`,
the decode cache in `phased_jax.model.cache`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from phased_jax.model import attention, quant
from phased_jax.model.attention import Mask, attend, make_mask
from phased_jax.model.cache import KVCache, write_cache
from phased_jax.model.config import ModelConfig
from phased_jax.model.lora import Adapter, LoraSpec
from phased_jax.model.rope import apply_rope, rope_tables

Array = jax.Array


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str | None, ...],
           init: Any, dtype: Any) -> Array:
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


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


def _weight(module: nn.Module, lora: LoraSpec | None, name: str, shape: tuple[int, ...],
            axes: tuple[str | None, ...], init: Any, dtype: Any, param_dtype: Any) -> Array:
    """A projection weight in the compute `dtype`: the `name` param, or with a quantised base
    (`lora.base_qtype`) its codes `<name>_q` and scales `<name>_absmax`, dequantised here."""
    qtype = "" if lora is None else lora.base_qtype
    if not qtype:
        return _param(module, name, shape, axes, init, param_dtype).astype(dtype)
    axis = quant.BLOCK_AXIS[name] - 1  # the params tree's layer axis is the scan's
    codes = _param(module, f"{name}_q", quant.code_shape(shape, qtype, axis), axes,
                   nn.initializers.zeros, quant.code_dtype(qtype))
    absmax = _param(module, f"{name}_absmax", quant.absmax_shape(shape, axis), axes,
                    nn.initializers.ones, jnp.float32)
    return quant.dequantize(codes, absmax, qtype, axis, dtype)


def _adapter(module: nn.Module, lora: LoraSpec | None, target: str, x: Array, in_spec: str
             ) -> Array | None:
    """`target`'s LoRA update of input `x` (None when it has no adapter); dropout on its input
    when the module trains (`Transformer.train`; the `dropout` rng)."""
    if lora is None or target not in lora.targets:
        return None
    return Adapter(module.cfg, lora, target, deterministic=not module.train,
                   name=f"lora_{target}")(x, in_spec)


def _plus(x: Array, delta: Array | None) -> Array:
    return x if delta is None else x + delta.astype(x.dtype)


class Attention(nn.Module):
    cfg: ModelConfig
    lora: LoraSpec | None = None
    train: bool = False

    @nn.compact
    def __call__(self, x_BxLxD: Array, cos: Array, sin: Array, mask: Mask,
                 kv: tuple[Array, Array, tuple[Array, ...], Array] | None
                 ) -> tuple[Array, tuple[Array, Array] | None]:
        """`kv`, when decoding: (k, v, layer, index), the caches holding this layer at `layer`
        (see `write_cache`) and the slot to write; returned with this step's keys and values."""
        cfg = self.cfg
        dtype, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        K, G, H, D = cfg.num_kv_heads, cfg.group_size, cfg.head_dim, cfg.hidden_size
        init = nn.initializers.normal(cfg.initializer_range)
        # Fused projection: per kv head, its G query heads, then its key, then its value.
        w_qkv = _weight(self, self.lora, "qkv", (D, K, G + 2, H),
                        ("embed", "kv_heads", None, "head_dim"), init, dtype, pdt)
        w_o = _weight(self, self.lora, "o", (K, G, H, D), ("kv_heads", None, "head_dim", "embed"),
                      init, dtype, pdt)

        qkv = jnp.einsum("bld,dkgh->blkgh", x_BxLxD, w_qkv)
        qkv = checkpoint_name(qkv, "qkv_proj")
        q_BxLxKxGxH = _plus(qkv[..., :G, :], _adapter(self, self.lora, "q", x_BxLxD, "d"))
        k_BxLxKxH = _plus(qkv[..., G, :], _adapter(self, self.lora, "k", x_BxLxD, "d"))
        v_BxLxKxH = _plus(qkv[..., G + 1, :], _adapter(self, self.lora, "v", x_BxLxD, "d"))
        q_BxLxKxGxH = apply_rope(q_BxLxKxGxH, cos[:, :, None, None, :], sin[:, :, None, None, :])
        k_BxLxKxH = apply_rope(k_BxLxKxH, cos[:, :, None, :], sin[:, :, None, :])
        q_BxLxKxGxH = nn.with_logical_constraint(
            q_BxLxKxGxH, ("batch", "length", "act_kv_heads", None, "head_dim"))

        k_BxSxKxH, v_BxSxKxH, new_kv = k_BxLxKxH, v_BxLxKxH, None
        if kv is not None:  # decoding: attend over the whole cache, this step written in
            k_all, v_all, layer, index = kv
            k_all, k_BxSxKxH = write_cache(k_all, k_BxLxKxH, layer, index)
            v_all, v_BxSxKxH = write_cache(v_all, v_BxLxKxH, layer, index)
            new_kv = (k_all, v_all)
        out_BxLxKxGxH = attend(q_BxLxKxGxH, k_BxSxKxH.astype(dtype), v_BxSxKxH.astype(dtype), mask)
        if kv is None:
            out_BxLxD = jnp.einsum("blkgh,kghd->bld", out_BxLxKxGxH, w_o)
        else:  # one plain matmul: the 4-d einsum has XLA CPU transpose w_o at every step
            B, L = x_BxLxD.shape[:2]
            out_BxLxD = (out_BxLxKxGxH.reshape(B, L, K * G * H)
                         @ w_o.reshape(K * G * H, D))
        out_BxLxD = _plus(out_BxLxD, _adapter(self, self.lora, "o", out_BxLxKxGxH, "kgh"))
        return checkpoint_name(out_BxLxD, "out_proj"), new_kv


class MLP(nn.Module):
    cfg: ModelConfig
    lora: LoraSpec | None = None
    train: bool = False

    @nn.compact
    def __call__(self, x_BxLxD: Array) -> Array:
        cfg = self.cfg
        dtype, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        init = nn.initializers.normal(cfg.initializer_range)
        D, F = cfg.hidden_size, cfg.intermediate_size
        w_in = _weight(self, self.lora, "wi", (D, 2, F), ("embed", None, "mlp"), init, dtype,
                       pdt)  # gate, up
        w_out = _weight(self, self.lora, "wo", (F, D), ("mlp", "embed"), init, dtype, pdt)
        h_BxLx2xF = jnp.einsum("bld,dcf->blcf", x_BxLxD, w_in)
        gate_BxLxF = _plus(h_BxLx2xF[..., 0, :], _adapter(self, self.lora, "gate", x_BxLxD, "d"))
        up_BxLxF = _plus(h_BxLx2xF[..., 1, :], _adapter(self, self.lora, "up", x_BxLxD, "d"))
        h_BxLxF = jax.nn.silu(gate_BxLxF) * up_BxLxF
        h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("batch", "length", "act_mlp"))
        out_BxLxD = jnp.einsum("blf,fd->bld", h_BxLxF, w_out)
        return _plus(out_BxLxD, _adapter(self, self.lora, "down", h_BxLxF, "f"))


class DecoderLayer(nn.Module):
    cfg: ModelConfig
    lora: LoraSpec | None = None
    train: bool = False

    @nn.compact
    def __call__(self, carry: Any, cos: Array, sin: Array, mask: Mask,
                 cache_index: Array | None, layer: Array | None):
        """carry: x [B, L, D], or when decoding (x, k, v): every layer's caches with this one
        at index `layer`, or this layer's own when `layer` is None. Returns (carry, None), as
        the layer scan wants."""
        cfg = self.cfg
        if cache_index is None:
            x_BxLxD, kv = carry, None
        else:
            x_BxLxD, k_all, v_all = carry
            kv = (k_all, v_all, () if layer is None else (layer,), cache_index)
        dtype, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "act_embed"))
        h = RMSNorm(cfg.rms_norm_eps, dtype, pdt, name="attn_norm")(x_BxLxD)
        attn_out, new_kv = Attention(cfg, self.lora, self.train, name="attn")(h, cos, sin, mask, kv)
        x_BxLxD = x_BxLxD + attn_out
        h = RMSNorm(cfg.rms_norm_eps, dtype, pdt, name="mlp_norm")(x_BxLxD)
        x_BxLxD = x_BxLxD + MLP(cfg, self.lora, self.train, name="mlp")(h)
        return (x_BxLxD if new_kv is None else (x_BxLxD, *new_kv)), None


def lm_head_logits(x_BxLxD: Array, head_DxV: Array) -> Array:
    """Logits of final-normed hidden states (`Transformer(..., return_hidden=True)`'s outputs),
    the head cast to the hidden states' (compute) dtype."""
    logits_BxLxV = jnp.einsum("bld,dv->blv", x_BxLxD, head_DxV.astype(x_BxLxD.dtype))
    return nn.with_logical_constraint(logits_BxLxV, ("batch", "length", "act_vocab"))


def _remat_policy(name: str):
    policies = jax.checkpoint_policies
    return {
        "full": policies.nothing_saveable,
        "dots": policies.checkpoint_dots,
        "dots_no_batch": policies.dots_with_no_batch_dims_saveable,
        "qkv_proj": policies.save_only_these_names("qkv_proj", "out_proj"),
    }[name]


class Transformer(nn.Module):
    """Decoder-only LM. `__call__` returns logits [batch, L, vocab] (and the new cache if given one).
    `lora`: LoRA adapters on the layers' projections (`phased_jax.model.lora`); `train`: the
    adapters' dropout is on (`model.lora.dropout` > 0; apply with a `dropout` rng)."""

    cfg: ModelConfig
    lora: LoraSpec | None = None
    train: bool = False

    @nn.compact
    def __call__(self, input_ids_BxL: Array, positions_BxL: Array | None = None,
                 segment_ids_BxL: Array | None = None, attention_mask_BxL: Array | None = None,
                 cache: KVCache | None = None, last_only: bool = False, return_hidden: bool = False):
        """last_only: logits of the last position only, [batch, 1, vocab] (a prefill needs no
        others, and the LM head over every prompt position is a large share of its work).
        return_hidden: (final-normed hidden states [batch, L, D], the LM head [D, vocab]: the
        `lm_head` parameter, or the embedding table transposed when tied) instead of logits, so a
        loss can apply the head a chunk at a time (`lm_head_logits(x, head)` gives exactly
        `__call__`'s logits); not with a cache."""
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
        cos, sin = rope_tables(positions_BxL, cfg)

        k_pos_BxS, k_seg_BxS = positions_BxL, segment_ids_BxL
        if cache is not None:  # keys: this step's slots and every slot written before
            k_pos_BxS = jax.lax.dynamic_update_slice(cache.positions, positions_BxL.astype(jnp.int32),
                                                     (0, cache.index))
            k_seg_BxS = jax.lax.dynamic_update_slice(cache.segment_ids,
                                                     segment_ids_BxL.astype(jnp.int32), (0, cache.index))
        # Initialising needs only shapes: xla, whatever platform the config's kernel wants.
        impl = "xla" if self.is_initializing() else attention.resolve_attention_impl(
            cfg.attention_impl, attention.mesh_platform(), dtype=cfg.dtype, strict=False)
        mask = make_mask(positions_BxL, segment_ids_BxL, k_pos_BxS, k_seg_BxS,
                         sliding_window=cfg.sliding_window, implementation=impl,
                         self_attention=cache is None, block_q=cfg.attention_block_q,
                         block_kv=cfg.attention_block_kv)
        if cache is None:
            x_BxLxD, _ = self._layer_scan(decoding=False)(x_BxLxD, cos, sin, mask, None, None)
        else:
            x_BxLxD, k, v = self.decode_layers(x_BxLxD, cos, sin, mask, cache)
            cache = KVCache(k=k, v=v, positions=k_pos_BxS, segment_ids=k_seg_BxS,
                            index=cache.index + L)

        if last_only:
            x_BxLxD = x_BxLxD[:, -1:]
        x_BxLxD = RMSNorm(cfg.rms_norm_eps, dtype, pdt, name="final_norm")(x_BxLxD)
        if cfg.tie_word_embeddings:  # no head of its own: the table, transposed, as HF ties it
            head_DxV = table_VxD.T  # ("embed", "vocab"), sharded as an untied head would be
        else:
            head_DxV = _param(self, "lm_head", (cfg.hidden_size, cfg.vocab_size),
                              ("embed", "vocab"), nn.initializers.normal(cfg.initializer_range), pdt)
        if return_hidden:  # the caller applies `lm_head_logits` itself, e.g. chunk by chunk
            return x_BxLxD, head_DxV
        logits_BxLxV = lm_head_logits(x_BxLxD, head_DxV)
        return logits_BxLxV if cache is None else (logits_BxLxV, cache)

    def _layer_scan(self, decoding: bool) -> nn.Module:
        """Every layer by one `nn.scan` over the stacked params (`layers`), rematerialised by the
        config's policy; when decoding the layer index is scanned too, to address the cache."""
        layer_cls = DecoderLayer
        if self.cfg.remat_policy != "none":
            layer_cls = nn.remat(layer_cls, policy=_remat_policy(self.cfg.remat_policy),
                                 prevent_cse=False)
        return nn.scan(
            layer_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast,
                     0 if decoding else nn.broadcast),
            length=self.cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(self.cfg, self.lora, self.train, name="layers")

    def decode_layers(self, x_BxLxD: Array, cos: Array, sin: Array, mask: Mask,
                      cache: KVCache) -> tuple[Array, Any, Any]:
        """(x, k, v) after every layer has read and written the cache. The layer scan carries
        the whole cache (no per-layer copy of it); a decoder may override this to run the layers
        another way (`phased_jax.generate.cpu`)."""
        (x_BxLxD, k, v), _ = self._layer_scan(decoding=True)(
            (x_BxLxD, cache.k, cache.v), cos, sin, mask, cache.index,
            jnp.arange(self.cfg.num_layers, dtype=jnp.int32))
        return x_BxLxD, k, v
