"""LoRA training parity with peft + torch AdamW (issue 23): 20 steps of one phase on
transformers' tiny Llama (GQA), the same base, the same fresh adapters, the same batches in the
same order and the same hyperparameters (warmup + cosine, decoupled weight decay on A and B,
clipping by global norm, Adam's betas and eps; our two accumulated micro-batches against torch's
whole batch, on the suite's 8 CPU devices). Per-step losses agree to 1e-4 relative; the final A
and B agree elementwise within the bound derived here.

The bound. Adam updates an element by u = m^ / (sqrt(v^) + eps), the bias-corrected moments
being weighted sums of the clipped gradients g_s, weights w1_s and w2_s each summing to 1. Let
the two runs' gradients differ by |dg_s| <= gamma * G_s, G_s the tensor's largest |g_s|, and
G^_t the largest G_s so far. Then |dm^| <= gamma * G^_t, |d sqrt(v^)| <= gamma * G^_t (a
weighted L2 norm moves by at most the perturbation's norm), |m^| / sqrt(v^) <= C_t =
sqrt(sum_s w1_s^2 / w2_s) (Cauchy-Schwarz; 1.04 after 20 steps of betas (0.9, 0.95)), so

    |du_t| <= min(2 C_t, (1 + C_t) * gamma * G^_t / (max(sqrt(v^_t) - gamma * G^_t, 0) + eps)).

Both runs apply -lr_t * (u_t + wd * theta) (torch: the decay, then the step), which contracts a
difference in theta rather than growing it, and round theta and the update a few times a step:

    |dtheta| <= sum_t lr_t * |du_t| + 3 U32 |theta_t| + 8 U32 lr_t (C_t + wd |theta_t|).

gamma is float32 rounding through the gradient, counted as `tests.model.helpers.rounding_bound`
counts it (2 n U32 of the largest entry), n the longest reduction (a weight gradient sums the
batch's B * L = 256 tokens) plus 32 for the roundings of Adam's moments, plus the 1e-6 that
`clip_grad_norm_` adds to the norm (relative 1e-6 / clip_norm). The runs' own drift (|dtheta|
~1e-6 of |theta| ~0.1) moves the gradients by far less than gamma. The sums use our run's own
g_t (from Adam's first moments), v^_t, lr_t and theta_t, so the bound is per element: an
element whose first non-zero gradient is near eps (A's first, the step after B leaves zero) may
differ by more than one that Adam normalises well.

Measured on CPU: losses within 2e-7 relative; max |dA| 3.5e-7, max |dB| 5e-8, no element past
3% of its bound; the bound's median is under 1/200 of how far the adapters moved (median
~3e-3, max ~1e-2), its largest element a quarter of the largest move. The loss tolerance alone
would pass torch without weight decay or with eps 1e-6 (losses within 2e-5); the bound fails
~2000 elements of either.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import optax
import pytest

from phased_jax import hf
from phased_jax.config import get_default_config
from phased_jax.hf.peft import from_peft, to_peft
from phased_jax.model.lora import MODULES, TARGETS, LoraSpec, kaiming_uniform_a, shapes
from phased_jax.train.trainer import Trainer

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from tests.hf.conftest import build_hf_model  # noqa: E402

STEPS, RANK, ALPHA, LR = 20, 4, 8.0, 1e-3
BATCH, SEQ, GRAD_ACCUM, DISTINCT = 16, 16, 2, 4  # 4 batches, 5 passes in the same order
CLIP = 0.6  # grad norms here are 0.5-0.8: clipping is on in some steps, off in others
HF_MODEL = dict(num_key_value_heads=2)
LOSS_RTOL = 1e-4
U32 = 2.0 ** -24
GAMMA = 2 * (BATCH * SEQ + 32) * U32 + 1e-6 / CLIP


def _train_section():
    c = get_default_config()
    c.train.update(global_batch=BATCH, grad_accum=GRAD_ACCUM, lr=LR, warmup_ratio=0.1,
                   schedule="cosine", min_lr_ratio=0.0, weight_decay=0.1, b1=0.9, b2=0.95,
                   eps=1e-8, clip_norm=CLIP, z_loss=0.0)
    c.mesh.shape = (1, -1, 1)
    return c.train, c.mesh


def _batches() -> list[dict[str, np.ndarray]]:
    """STEPS batches, DISTINCT of them cycled: prompts of 1-7 tokens out of the loss, rows
    right-padded to SEQ (padding out of the loss and, being last, seen by no real token)."""
    out = []
    for i in range(DISTINCT):
        rs = np.random.RandomState(100 + i)
        ids = rs.randint(3, 128, (BATCH, SEQ + 1)).astype(np.int32)
        lengths = rs.randint(SEQ // 2, SEQ + 1, BATCH)
        prompts = rs.randint(1, SEQ // 2, BATCH)
        pos = np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1))
        seg = (pos < lengths[:, None]).astype(np.int32)
        mask = ((pos >= prompts[:, None]) & (seg == 1)).astype(np.int32)
        out.append(dict(input_ids=ids[:, :-1], targets=ids[:, 1:], loss_mask=mask,
                        segment_ids=seg, positions=pos))
    return [out[t % DISTINCT] for t in range(STEPS)]


def _fresh_adapters(cfg, spec) -> dict:
    """Fresh adapters as `init_state` draws them (A Kaiming-uniform, B zero), without tracing
    the whole model's init."""
    layers: dict = {}
    for i, t in enumerate(spec.targets):
        (a_shape, _), (b_shape, _) = shapes(cfg, t, spec.rank)
        keys = jax.random.split(jax.random.key(i), cfg.num_layers)  # one draw per layer
        a = jax.vmap(lambda k, a_shape=a_shape: kaiming_uniform_a(k, a_shape))(keys)
        layers.setdefault("attn" if t in ("q", "k", "v", "o") else "mlp", {})[f"lora_{t}"] = {
            "a": np.asarray(a, np.float32), "b": np.zeros((cfg.num_layers, *b_shape), np.float32)}
    return {"layers": layers}


def _adam_c(count: int, b1: float, b2: float) -> float:
    """sqrt(sum_s w1_s^2 / w2_s): the most |m^| / sqrt(v^) can be after `count` updates."""
    k = np.arange(count)
    w1 = (1 - b1) * b1 ** k / (1 - b1 ** count)
    w2 = (1 - b2) * b2 ** k / (1 - b2 ** count)
    return float(np.sqrt(np.sum(w1 ** 2 / w2)))


def _ours(cfg, params, spec, initial, batches):
    """Our LoRA Trainer's losses, final adapters, and the elementwise bound on |ours - torch|."""
    train, mesh = _train_section()
    trainer = Trainer(cfg, train, mesh, lora=spec)
    trainer.set_base(params)
    state = trainer.init_state(STEPS, params=initial)
    b1, b2, eps, wd = float(train.b1), float(train.b2), float(train.eps), float(train.weight_decay)
    f64 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(tree))
    mu_prev = jax.tree.map(np.zeros_like, f64(initial))
    g_max = jax.tree.map(lambda _: 0.0, mu_prev)
    bound = jax.tree.map(np.zeros_like, mu_prev)
    losses = []
    for t, batch in enumerate(batches):
        state, metrics = trainer.step(state, trainer.shard_batch(batch))
        losses.append(float(metrics["loss"]))
        lr, c = float(metrics["lr"]), _adam_c(t + 1, b1, b2)
        mu = f64(optax.tree_utils.tree_get(state.opt_state, "mu"))
        nu = f64(optax.tree_utils.tree_get(state.opt_state, "nu"))
        grad = jax.tree.map(lambda m, p: (m - b1 * p) / (1 - b1), mu, mu_prev)  # clipped g_t
        g_max = jax.tree.map(lambda gm, g: max(gm, float(np.abs(g).max())), g_max, grad)

        def add(bd, gm, v, th, lr=lr, c=c, count=t + 1):
            err = GAMMA * gm
            denom = np.maximum(np.sqrt(v / (1 - b2 ** count)) - err, 0.0) + eps
            du = np.minimum(2 * c, (1 + c) * err / denom)
            return bd + lr * du + 3 * U32 * np.abs(th) + 8 * U32 * lr * (c + wd * np.abs(th))

        bound = jax.tree.map(add, bound, g_max, nu, f64(state.params))
        mu_prev = mu
    return losses, jax.device_get(state.params), bound


def _theirs(cfg, spec, initial, batches):
    """peft on transformers' model from the same adapters; torch AdamW over A and B only, all
    decayed (our mask spares only norm scales); HF's warmup + cosine; torch's clipping."""
    train, _ = _train_section()
    model = peft.get_peft_model(
        build_hf_model("llama", **HF_MODEL),
        peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0,
                        target_modules=[MODULES[t].split(".")[-1] for t in spec.targets]))
    start = to_peft(cfg, spec, initial)
    peft.set_peft_model_state_dict(model, {k: torch.as_tensor(v) for k, v in start.items()})
    model.train()
    named = {k.replace(".default", ""): p for k, p in model.named_parameters() if p.requires_grad}
    assert sorted(named) == sorted(start)
    for k, p in named.items():
        np.testing.assert_array_equal(p.detach().numpy(), start[k], err_msg=k)
    opt = torch.optim.AdamW(list(named.values()), lr=float(train.lr),
                            betas=(float(train.b1), float(train.b2)), eps=float(train.eps),
                            weight_decay=float(train.weight_decay))
    sched = transformers.get_cosine_schedule_with_warmup(
        opt, math.ceil(float(train.warmup_ratio) * STEPS), STEPS)
    losses = []
    for batch in batches:
        logits = model(input_ids=torch.as_tensor(batch["input_ids"], dtype=torch.long),
                       attention_mask=torch.as_tensor(batch["segment_ids"])).logits
        ce = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            torch.as_tensor(batch["targets"], dtype=torch.long).reshape(-1), reduction="none")
        mask = torch.as_tensor(batch["loss_mask"], dtype=torch.float32).reshape(-1)
        loss = (ce * mask).sum() / mask.sum()  # mean over the batch's response tokens
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(named.values()), float(train.clip_norm))
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses, from_peft(cfg, spec, {k: p.detach().numpy() for k, p in named.items()})


def _at(tree, path):
    for k in path:
        tree = tree[k.key]
    return np.asarray(tree)


def test_lora_training_matches_peft_and_torch_adamw(tmp_path):
    build_hf_model("llama", **HF_MODEL).save_pretrained(tmp_path)
    model, params = hf.load(tmp_path, dtype="float32")
    cfg, spec = model.cfg, LoraSpec(RANK, ALPHA, TARGETS)
    initial, batches = _fresh_adapters(cfg, spec), _batches()

    ours, final, bound = _ours(cfg, params, spec, initial, batches)
    theirs, their_final = _theirs(cfg, spec, initial, batches)

    np.testing.assert_allclose(ours, theirs, rtol=LOSS_RTOL)
    assert np.mean(ours[-DISTINCT:]) < np.mean(ours[:DISTINCT]), "the same batches, lower loss"
    for path, got in jax.tree_util.tree_flatten_with_path(final)[0]:
        name = jax.tree_util.keystr(path)
        want, start, limit = _at(their_final, path), _at(initial, path), _at(bound, path)
        diff, moved = np.abs(got - want), np.abs(got - start)
        assert np.all(diff <= limit), (
            f"{name}: max |ours - peft| {diff.max():.3g}, worst diff / bound "
            f"{np.max(diff / limit):.3g}")
        # the bound says something: far below how far the adapters travelled
        assert np.median(limit) < 1e-2 * np.median(moved), (name, np.median(limit),
                                                          np.median(moved))
        assert limit.max() < 0.5 * moved.max(), (name, limit.max(), moved.max())
        assert moved.max() > 3 * LR, f"{name} hardly moved"
        if name.endswith("['b']"):
            assert not np.any(start) and np.all(got != 0), f"{name}: B starts at zero, then moves"
