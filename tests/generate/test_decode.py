"""Greedy decoding equals transformers' `generate`, token for token, for Llama and Mistral."""

from __future__ import annotations

import numpy as np
import pytest

from phased_jax.generate.decode import Sampling, generate_ids, sample_next

from .conftest import VOCAB, load_hf

NEW_TOKENS = 20


def _hf_greedy(path, prompts: list[list[int]]) -> list[list[int]]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()
    out = []
    for p in prompts:  # one row at a time, unpadded: the reference has no padding to get wrong
        with torch.no_grad():
            seq = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=2,
                                 pad_token_id=0)
        out.append(seq[0, len(p):].tolist())
    return [a[: a.index(2) + 1] if 2 in a else a for a in out]


@pytest.mark.parametrize("arch,unstack", [("llama", None), ("mistral", None), ("mistral", False)],
                         ids=["llama", "mistral", "mistral-layer-scan"])
def test_greedy_matches_transformers(tiny_hf, arch, unstack):
    """`unstack=False` forces the layer-scan decode path that GPUs and TPUs take."""
    rng = np.random.default_rng(1)
    # 12 tokens + 20 new is well past Mistral's window of 8; lengths differ so rows are left-padded.
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (12, 5, 9)]
    expected = _hf_greedy(tiny_hf[arch], prompts)
    model, params = load_hf(tiny_hf[arch])
    got = generate_ids(model, params, prompts, eos_token_ids=[2], max_new_tokens=NEW_TOKENS,
                       max_length=256, batch_size=4, keep_eos=True, unstack=unstack)
    assert got == expected
    assert sum(len(a) for a in got) > 2 * NEW_TOKENS  # not all cut short by an early EOS
    # one prompt alone (the other rows empty) agrees too: no dependence on the batch's padding
    assert generate_ids(model, params, prompts[:1], eos_token_ids=[2], max_new_tokens=NEW_TOKENS,
                        max_length=256, batch_size=4, keep_eos=True,
                        unstack=unstack) == expected[:1]


def test_budget_and_order(tiny_hf):
    # Shapes as in the llama parity test (batch 4, prompt 16, answer 20): no new compile.
    model, params = load_hf(tiny_hf["llama"])
    prompts = [[5] * 14, [7] * 3, [9] * 10]
    got = generate_ids(model, params, prompts, eos_token_ids=[], max_new_tokens=NEW_TOKENS,
                       max_length=30, batch_size=4)
    # max_length counts the prompt: 30 - 14 = 16 new tokens for the first row
    assert [len(a) for a in got] == [16, 20, 20]
    alone = generate_ids(model, params, prompts[1:2], eos_token_ids=[],
                         max_new_tokens=NEW_TOKENS, max_length=30, batch_size=4)
    assert got[1] == alone[0]  # input order kept after sorting by length


def test_top_p_keeps_only_the_nucleus():
    import jax
    import jax.numpy as jnp

    logits = jnp.log(jnp.tile(jnp.array([[0.6, 0.3, 0.05, 0.05]]), (400, 1)))
    draws = np.asarray(sample_next(logits, jax.random.key(0), Sampling(1.0, 0.8)))
    assert set(draws.tolist()) == {0, 1}  # 0.6 + 0.3 covers 0.8: tokens 2 and 3 never drawn
    assert 0.5 < np.mean(draws == 0) < 0.8  # renormalised: 0.6 / 0.9
    hot = np.asarray(sample_next(logits, jax.random.key(1), Sampling(1.0, 1.0)))
    assert set(hot.tolist()) == {0, 1, 2, 3}
    assert np.all(np.asarray(sample_next(logits, jax.random.key(0), Sampling())) == 0)


def test_unstack_layers_views_and_copies_agree(tiny_hf):
    """Outside jit the split is views of the stack (no copy); inside jit, slices: same values."""
    import jax

    from phased_jax.generate.cpu import unstack_layers

    _, params = load_hf(tiny_hf["llama"])
    stacked = params["layers"]["attn"]["qkv"]
    views = unstack_layers(params)["layers"]
    copies = jax.jit(unstack_layers)(params)["layers"]
    assert len(views) == len(copies) == stacked.shape[0]
    for i, (v, c) in enumerate(zip(views, copies, strict=True)):
        assert np.array_equal(np.asarray(v["attn"]["qkv"]), np.asarray(stacked[i]))
        assert np.array_equal(np.asarray(c["attn"]["qkv"]), np.asarray(stacked[i]))
    assert views[1]["attn"]["qkv"].unsafe_buffer_pointer() == (
        stacked.unsafe_buffer_pointer() + stacked[0].nbytes)  # aliases the stack's memory
