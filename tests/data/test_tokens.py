"""Templates, the loss mask, truncation, packing (checked with the real model) and the cache."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phased_jax.data.loader import PhaseLoader
from phased_jax.data.records import Record
from phased_jax.data.templates import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, encode_prompt, render
from phased_jax.data.tokens import build_rows, pack, tokenize, tokenize_cached
from phased_jax.model import Transformer, get_preset
from tests.data.conftest import make_records

REC = Record("1", "Translate the sentence.", "The cat sat.", "Le chat.", 2.0, "m:1")


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_authors_template_ids_and_mask(tokenizer):
    ex, rep = tokenize([REC], "authors", tokenizer, 512)
    ids, trained = ex.example(0)
    p = int(np.argmax(trained))
    prompt = [1, *enc(tokenizer, "User: Translate the sentence.\nThe cat sat."), 2,
              *enc(tokenizer, "\nAssistant: ")]
    target = [*enc(tokenizer, "Le chat."), 2]
    assert ids.tolist() == prompt + target
    assert trained.tolist() == [False] * len(prompt) + [True] * len(target)
    row = build_rows(ex, [np.array([0])])
    n = len(ids)
    mask = row["loss_mask"][0]
    # loss exactly where the target is a response token: positions p-1 .. n-2
    assert np.flatnonzero(mask).tolist() == list(range(p - 1, n - 1))
    assert row["targets"][0, p - 1:n - 1].tolist() == target
    assert row["input_ids"][0, :n].tolist() == ids.tolist()
    assert (row["input_ids"][0, n:] == 0).all() and (row["segment_ids"][0, n:] == 0).all()
    assert row["segment_ids"][0, :n].tolist() == [1] * n
    assert row["positions"][0, :n].tolist() == list(range(n))
    assert {k: v.dtype for k, v in row.items()} == {k: np.int32 for k in row}


def test_template_texts(tokenizer):
    no_input = REC.__class__("2", "Say hi.", "", "Hi.", 1.0, "m:2")
    assert render("Say hi.", "", "Hi.", "authors")[0][1] == "User: Say hi."  # no trailing newline
    assert render(REC.instruction, REC.input, None, "alpaca")[0][1] == ALPACA_WITH_INPUT.format(
        instruction=REC.instruction, input=REC.input)
    assert render("Say hi.", "", None, "alpaca")[0][1] == ALPACA_NO_INPUT.format(instruction="Say hi.")
    prompt, target = render("Say hi.", "", "Hi.", "chat", tokenizer)
    assert prompt == ["<s>User: Say hi.</s>\nAssistant: "] and target == ["Hi.</s>"]
    ex, _ = tokenize([no_input], "chat", tokenizer, 64)
    ids, trained = ex.example(0)
    p = int(np.argmax(trained))
    assert ids[0] == 1 and ids[-1] == 2 and ids[:p].tolist() == encode_prompt(
        "Say hi.", "", "chat", tokenizer)
    ex_a, _ = tokenize([no_input], "authors", tokenizer, 64)
    assert ex_a.example(0)[0].tolist() == ids.tolist()  # the test tokenizer's chat = authors' shape


def test_truncation_and_prompt_filling_skip(tokenizer):
    long_out = REC.__class__("3", "Say.", "", "water " * 50, 3.0, "m:3")
    long_prompt = REC.__class__("4", "rain " * 60, "", "ok", 3.0, "m:4")
    ex, rep = tokenize([REC, long_out, long_prompt], "authors", tokenizer, 40)
    assert list(ex.record_ids) == ["1", "3"] and ex.lengths[0] < 40 and ex.lengths[1] == 40
    assert rep.truncated == 1
    assert rep.skipped[0]["id"] == "4" and rep.skipped[0]["reason"] == "prompt_fills_max_length"
    row = build_rows(ex, [np.array([1])])
    assert row["loss_mask"][0].sum() == ex.trained_counts[1]  # every kept target token trained
    assert ex.trained_counts[1] == 40 - np.argmax(ex.example(1)[1])


def test_pack_next_fit():
    assert pack(np.array([3, 4, 2, 5, 1]), 7).tolist() == [0, 2, 4, 5]
    assert pack(np.array([], np.int64), 7).tolist() == [0]


def token_loss_fn(model):
    """Per-token cross-entropy times loss_mask, as the train step computes it."""

    @jax.jit
    def token_nll(params, b):
        logits = model.apply({"params": params}, b["input_ids"], b["positions"], b["segment_ids"])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.take_along_axis(logp, b["targets"][..., None], -1)[..., 0] * b["loss_mask"]

    return lambda params, batch: np.asarray(token_nll(params, batch))


def test_packed_equals_unpacked_losses(tokenizer):
    ex, _ = tokenize(make_records(24, seed=3), "authors", tokenizer, 96)
    cfg = get_preset("tiny-llama", vocab_size=len(tokenizer))
    model = Transformer(cfg)
    # random parameters without compiling init (slow on a loaded 2-core machine)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                          jnp.zeros((1, 96), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    flat = PhaseLoader(ex, 32, 1, seed=5, phase_index=0)
    packed = PhaseLoader(ex, 32, 1, seed=5, phase_index=0, packing=True)
    assert flat.steps == packed.steps == 1
    fb, pb = flat.batch(0), packed.batch(0)
    assert (pb["segment_ids"] > 1).any()  # something really got packed
    loss_fn = token_loss_fn(model)  # one compile: both layouts have the same shapes
    loss_flat, loss_packed = loss_fn(params, fb), loss_fn(params, pb)
    by_flat = {int(r[0]): loss_flat[i].sum() for i, r in enumerate(flat.rows(0)) if r is not None}
    by_packed = {}
    for i, r in enumerate(packed.rows(0)):
        if r is None:
            continue
        for seg, e in enumerate(r.tolist(), 1):
            by_packed[e] = loss_packed[i][pb["segment_ids"][i] == seg].sum()
    assert sorted(by_flat) == sorted(by_packed) == list(range(24))
    for e in by_flat:
        np.testing.assert_allclose(by_packed[e], by_flat[e], rtol=1e-5, atol=1e-5)
    # the mask covers exactly the response tokens: same count in both layouts
    assert fb["loss_mask"].sum() == pb["loss_mask"].sum() == sum(
        ex.trained_counts[i] for i in range(24))
    # packed: the last token of every example carries no loss and positions restart
    for i, r in enumerate(packed.rows(0)):
        if r is None:
            continue
        seg = pb["segment_ids"][i]
        for s in range(1, len(r) + 1):
            idx = np.flatnonzero(seg == s)
            assert pb["loss_mask"][i, idx[-1]] == 0 and pb["positions"][i, idx].tolist() == list(
                range(len(idx)))


def test_cache_reused_and_keyed(tokenizer, tmp_path, monkeypatch):
    rs = make_records(10)
    ex1, rep1, path1 = tokenize_cached(rs, "authors", tokenizer, 64, tmp_path)
    assert path1.exists() and not list(tmp_path.glob(".*tmp*"))
    import phased_jax.data.tokens as tokens

    def boom(*a, **k):
        raise AssertionError("tokenised again despite the cache")

    monkeypatch.setattr(tokens, "tokenize", boom)
    ex2, rep2, path2 = tokenize_cached(rs, "authors", tokenizer, 64, tmp_path)
    assert path2 == path1 and (ex2.ids == ex1.ids).all() and (ex2.offsets == ex1.offsets).all()
    assert list(ex2.record_ids) == list(ex1.record_ids) and rep2.truncated == rep1.truncated
    monkeypatch.undo()
    _, _, p_len = tokenize_cached(rs, "authors", tokenizer, 48, tmp_path)
    _, _, p_tpl = tokenize_cached(rs, "alpaca", tokenizer, 64, tmp_path)
    _, _, p_rec = tokenize_cached(rs[:-1], "authors", tokenizer, 64, tmp_path)
    assert len({path1, p_len, p_tpl, p_rec}) == 4


@pytest.mark.parametrize("template", ["authors", "alpaca", "chat"])
def test_every_template_masks_prompt(tokenizer, template):
    ex, _ = tokenize(make_records(6), template, tokenizer, 256)
    rows = build_rows(ex, [np.array([i]) for i in range(6)])
    for i in range(6):
        p, n = int(np.argmax(ex.example(i)[1])), int(ex.lengths[i])
        assert np.flatnonzero(rows["loss_mask"][i]).tolist() == list(range(p - 1, n - 1))
        assert rows["targets"][i, n - 2] == 2  # the final EOS is trained
