"""Every remat policy recomputes the same maths: its gradients are the no-remat gradients."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import pytest

from phased_jax.model.config import REMAT_POLICIES
from tests.train.helpers import fixed_batch

from .helpers import rounding_bound, tiny_model

REMAT = re.compile(r"\b(remat2?|checkpoint)\[")  # jax.checkpoint's primitive, as jaxprs print it


@functools.cache
def gradients(arch: str, policy: str) -> tuple[dict, str]:
    """The mean masked next-token loss's gradients, and the jaxpr that computes them."""
    model, params = tiny_model(arch, remat_policy=policy)
    batch = fixed_batch()  # packed and padded rows of 16 tokens, twice Mistral's window

    def loss(p):
        logits = model.apply({"params": p}, batch["input_ids"], positions_BxL=batch["positions"],
                             segment_ids_BxL=batch["segment_ids"])
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        return jnp.sum(nll * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])

    grad = jax.grad(loss)
    return jax.device_get(jax.jit(grad)(params)), str(jax.make_jaxpr(grad)(params))


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_remat_policy_gives_the_plain_gradients(arch, policy):
    (want, plain_jaxpr), (got, jaxpr) = gradients(arch, "none"), gradients(arch, policy)
    assert REMAT.search(jaxpr) and not REMAT.search(plain_jaxpr)  # the policy is applied
    cfg = tiny_model(arch)[0].cfg
    excess = jax.tree.map(lambda g, w: float(abs(g - w).max()) / rounding_bound(w, cfg), got, want)
    assert max(jax.tree.leaves(excess)) <= 1, excess
