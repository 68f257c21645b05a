"""Splash attention (Pallas interpret mode on CPU) computes the reference's attention and
gradients for every mask the model uses, alone, inside the model and sharded over a mesh; cuDNN's
mask arguments say the same mask; `auto` picks each platform's kernel."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from phased_jax.accelerators import parse_tpu, tpu_devices
from phased_jax.errors import ConfigError
from phased_jax.model import attention
from phased_jax.model.attention import attend, make_mask, resolve_attention_impl
from phased_jax.train.trainer import build_trainer
from tests.train.helpers import tiny_config

from .helpers import VOCAB, tiny_model

SEQ, BLOCK = 256, 128  # two blocks each way: whole, partial and skipped blocks all occur
# float32 acceptance: the kernel sums the same terms blockwise with an online softmax;
# measured differences are ~1e-6 of the largest value.
TOL = 1e-5


def rows(batch: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """(segment ids, positions): one full row, one packing three examples, one ending in
    padding, repeated to `batch` rows; positions restart at each example, 0 at padding."""
    seg = np.ones((3, seq), np.int32)
    seg[1, seq // 3:] = 2
    seg[1, seq - seq // 4:] = 3
    seg[2, seq - seq // 3:] = 0
    seg = np.resize(seg, (batch, seq))
    pos = np.zeros_like(seg)
    for r, row in enumerate(seg):
        for s in np.unique(row[row != 0]):
            idx = np.flatnonzero(row == s)
            pos[r, idx] = np.arange(idx.size)
    return seg, pos


def qkv(batch: int, kv_heads: int, group: int, head_dim: int = 32, seq: int = SEQ):
    r = np.random.RandomState(0)
    q = r.randn(batch, seq, kv_heads, group, head_dim) * 2  # wide scores: a wrong mask shows
    k, v, w = (r.randn(batch, seq, kv_heads, head_dim), r.randn(batch, seq, kv_heads, head_dim),
               r.randn(batch, seq, kv_heads, group, head_dim))
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v, w))


def attention_and_grads(impl: str, q, k, v, w, seg, pos, window: int):
    """Output and d/d(q, k, v) of sum(w * output) over the non-padding queries."""
    real = jnp.asarray(seg != 0)[:, :, None, None, None]

    def loss(q, k, v):
        mask = make_mask(pos, seg, pos, seg, sliding_window=window, implementation=impl,
                         self_attention=True, block_q=BLOCK, block_kv=BLOCK)
        out = attend(q, k, v, mask)
        return jnp.sum(jnp.where(real, out * w, 0.0)), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def assert_close(got, want, real):
    got, want = np.asarray(got), np.asarray(want)
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(got - want)[real].max() <= TOL * scale


@pytest.mark.parametrize("kv_heads,group,window", [(4, 1, 0), (2, 2, 0), (2, 2, 48)],
                         ids=["causal", "gqa", "gqa-window"])
def test_splash_gives_the_reference_attention_and_gradients(kv_heads, group, window):
    q, k, v, w = qkv(3, kv_heads, group)
    seg, pos = rows(3, SEQ)
    run = jax.jit(attention_and_grads, static_argnums=(0, 7))
    want_out, want_grads = run("xla", q, k, v, w, seg, pos, window)
    got_out, got_grads = run("splash", q, k, v, w, seg, pos, window)
    real = seg != 0  # a pad query sees nothing under the rule: its output is arbitrary
    assert_close(got_out, want_out, real)
    for got, want in zip(got_grads, want_grads, strict=True):
        assert_close(got, want, real)  # pad keys get no gradient from real queries either
    assert np.abs(np.asarray(want_grads[1])).max() > 0.1  # the gradients are not trivially 0


def test_the_model_with_splash_gives_the_reference_logits_and_gradients():
    seg, pos = rows(2, BLOCK)
    ids = np.random.RandomState(1).randint(3, VOCAB, seg.shape).astype(np.int32)
    loss_mask = jnp.asarray(seg != 0)

    def run(model, params):
        def loss(params):
            logits = model.apply({"params": params}, ids, positions_BxL=pos, segment_ids_BxL=seg)
            ce = -jax.nn.log_softmax(logits, axis=-1)[..., 0]
            return jnp.sum(jnp.where(loss_mask, ce, 0.0)), logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    overrides = dict(attention_block_q=BLOCK, attention_block_kv=BLOCK)
    ref, params = tiny_model("mistral", attention_impl="xla", **overrides)  # window 8 < 128
    model, _ = tiny_model("mistral", attention_impl="splash", **overrides)
    (_, want_logits), want_grads = run(ref, params)
    (_, got_logits), got_grads = run(model, params)
    assert_close(got_logits, want_logits, seg != 0)
    for path, want in jax.tree_util.tree_leaves_with_path(want_grads):
        got = np.asarray(dict(jax.tree_util.tree_leaves_with_path(got_grads))[path])
        assert_close(got, want, np.ones(got.shape, bool)), jax.tree_util.keystr(path)


def test_splash_runs_sharded_over_batch_and_heads_on_a_mesh():
    assert len(jax.devices()) == 8
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    rules = (("batch", ("data", "fsdp")), ("act_kv_heads", "tensor"))
    q, k, v, w = qkv(4, 2, 2, seq=BLOCK)
    seg, pos = rows(4, BLOCK)
    args = ("splash", q, k, v, w, seg, pos, 0)
    want_out, want_grads = jax.jit(attention_and_grads, static_argnums=(0, 7))("xla", *args[1:])
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        jaxpr = str(jax.make_jaxpr(attention_and_grads, static_argnums=(0, 7))(*args))
        got_out, got_grads = jax.jit(attention_and_grads, static_argnums=(0, 7))(*args)
    # each device runs the kernel on its 1 row of 4 and 1 kv head of 2
    assert "shard_map" in jaxpr and "f32[1,128,1,2,32]" in jaxpr
    real = seg != 0
    assert_close(got_out, want_out, real)
    for got, want in zip(got_grads, want_grads, strict=True):
        assert_close(got, want, real)


def test_splash_interprets_off_tpu_and_reads_the_mesh_platform():
    assert attention.mesh_platform() == "cpu"
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    with jax.set_mesh(mesh):
        assert attention.mesh_platform() == "cpu"
        seen = []
        jax.jit(lambda: seen.append(attention.mesh_platform()))()
        assert seen == ["cpu"]  # readable inside jit, from the mesh's devices


@pytest.mark.parametrize("window", [0, 5])
def test_cudnn_arguments_say_the_mask_for_causal_padded_rows(window):
    """jax's XLA path given the same arguments as cuDNN gets computes the reference."""
    q, k, v, _ = qkv(3, 2, 2, seq=16)
    seg = np.ones((3, 16), np.int32)
    seg[1, 11:] = 0  # right padding: the form cuDNN's per-row lengths express
    seg[2] = 0  # a row of padding only (the last batch of `score`)
    pos = np.tile(np.arange(16, dtype=np.int32), (3, 1))
    mask = make_mask(pos, seg, pos, seg, sliding_window=window, implementation="cudnn",
                     self_attention=True)
    assert mask.dense_BxLxS is None and mask.implementation == "cudnn"
    want = attend(q, k, v, make_mask(pos, seg, pos, seg, sliding_window=window,
                                     implementation="xla", self_attention=True))
    got = attention._cudnn(q, k, v, mask, implementation="xla")
    assert_close(got, want, seg != 0)
    assert np.isfinite(np.asarray(got)).all()  # pad queries: arbitrary, never NaN
    assert attention.cudnn_arguments(mask)["key_value_seq_lengths"].tolist() == [16, 11, 1]


def test_segment_kernels_attend_over_a_cache_with_xla():
    pos = seg = jnp.ones((1, 4), jnp.int32)
    for impl in ("splash", "cudnn"):
        mask = make_mask(pos, seg, pos, seg, sliding_window=0, implementation=impl,
                         self_attention=False)
        assert mask.implementation == "xla" and mask.dense_BxLxS is not None


def test_auto_picks_each_platforms_kernel():
    assert resolve_attention_impl("auto", "tpu") == "splash"
    assert resolve_attention_impl("auto", "gpu") == "cudnn"
    assert resolve_attention_impl("auto", "cpu") == "xla"
    # cuDNN cannot say packed segments, nor take float32: auto falls back to xla
    assert resolve_attention_impl("auto", "gpu", packing=True) == "xla"
    assert resolve_attention_impl("auto", "gpu", dtype="float32") == "xla"
    assert resolve_attention_impl("splash", "cpu") == "splash"  # interpret mode (tests)


@pytest.mark.parametrize("impl,platform,kw,match", [
    ("cudnn", "gpu", dict(packing=True), "cannot express packed segments"),
    ("cudnn", "tpu", {}, "needs a GPU"),
    ("cudnn", "gpu", dict(dtype="float32"), "needs bfloat16"),
    ("splash", "gpu", {}, "is a TPU kernel"),
])
def test_a_kernel_the_platform_cannot_run_is_a_config_error(impl, platform, kw, match):
    with pytest.raises(ConfigError, match=match):
        resolve_attention_impl(impl, platform, **kw)
    assert resolve_attention_impl(impl, platform, strict=False, **kw) == "xla"


def test_the_trainer_resolves_auto_for_its_devices_and_refuses_what_they_cannot_run():
    c = tiny_config()
    c.model.attention_impl = "auto"
    trainer = build_trainer(c)
    assert trainer.model.cfg.attention_impl == "xla"  # CPU devices
    assert trainer.model_cfg.attention_impl == "auto"  # saved with params: portable
    c.model.attention_impl = "cudnn"
    with pytest.raises(ConfigError, match="cudnn.*needs a GPU"):
        build_trainer(c)


def test_splash_compiles_to_the_mosaic_kernel_for_tpu_devices():
    """From this CPU host, for a TPU topology: the platform comes from the mesh, so the kernel
    is the TPU custom call, not interpret mode's loops (which have none)."""
    pytest.importorskip("libtpu")
    devices = tpu_devices(parse_tpu("v5e-4"))
    mesh = Mesh(np.array(devices).reshape(1, 2, 2), ("data", "fsdp", "tensor"),
                axis_types=(AxisType.Auto,) * 3)
    rules = (("batch", ("data", "fsdp")), ("act_kv_heads", "tensor"))
    B, L, K, G, H = 2, 2 * BLOCK, 2, 2, 128  # the kernel wants 128-lane heads on TPU
    spec = lambda *s: NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, *s))
    q = jax.ShapeDtypeStruct((B, L, K, G, H), jnp.bfloat16, sharding=spec("tensor"))
    kv = jax.ShapeDtypeStruct((B, L, K, H), jnp.bfloat16, sharding=spec("tensor"))
    seg = jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=spec())

    def loss(q, k, v, seg):
        pos = jnp.broadcast_to(jnp.arange(L), seg.shape)
        mask = make_mask(pos, seg, pos, seg, sliding_window=BLOCK // 2, implementation="splash",
                         self_attention=True, block_q=BLOCK, block_kv=BLOCK)
        return jnp.sum(attend(q, k, v, mask).astype(jnp.float32))

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, seg)
    assert lowered.as_text().count("tpu_custom_call") == 3  # forward, dq, dk/dv
    lowered.compile()
