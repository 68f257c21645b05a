"""The pretraining corpus: true facts in prose, no test word, fits the base model's length."""

import json

import pytest

from phased_jax.demo import corpus, tasks


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    exclude = {"naduk", "bozok"}
    info = corpus.build_corpus(d / "c.jsonl", 400, exclude, seed=0)
    rows = [json.loads(x) for x in (d / "c.jsonl").read_text().splitlines()]
    return d, info, rows, exclude


def test_every_sentence_is_a_true_fact_and_chains(built):
    _, info, rows, _ = built
    assert info["n_docs"] == len(rows) == 400
    by_phrase = {p: op for op, p in corpus.PROSE.items()}
    for r in rows:
        assert r["instruction"] and r["input"] == "" and r["output"].endswith(".")
        previous, ops = None, []
        for sentence in r["output"][:-1].split(corpus.SEPARATOR):
            phrase = next(p for p in by_phrase if p in sentence)
            subject, result = sentence.split(phrase)
            assert tasks.OPS[by_phrase[phrase]].apply(subject) == result
            assert previous is None or subject == previous  # each step starts from the last
            previous = result
            ops.append(by_phrase[phrase])
        assert sorted(ops) == sorted(tasks.OPS)  # every operation once


def test_no_excluded_word_and_same_bytes_for_same_seed(built):
    d, _, rows, exclude = built
    starts = {r["output"].split(" ")[0] for r in rows}
    assert not starts & exclude
    corpus.build_corpus(d / "again.jsonl", 400, exclude, seed=0)
    assert (d / "again.jsonl").read_bytes() == (d / "c.jsonl").read_bytes()
    corpus.build_corpus(d / "other.jsonl", 400, exclude, seed=1)
    assert (d / "other.jsonl").read_bytes() != (d / "c.jsonl").read_bytes()


def test_fits_the_pretraining_length_with_char_level_words(built):
    build_tokenizer = pytest.importorskip("phased_jax.data.toy_tokenizer").build_tokenizer
    from phased_jax.data.templates import encode_parts, render
    from phased_jax.demo.config import BYTE_VOCAB, pretrain_config

    d, _, rows, _ = built
    tok = build_tokenizer([r["output"] for r in rows], BYTE_VOCAB, d / "tok")
    tok.add_tokens(tasks.prompt_phrases() + corpus.prose_phrases())
    max_length = pretrain_config().data.max_length
    for r in rows:
        prompt, target = render(r["instruction"], r["input"], r["output"], "text")
        ids = encode_parts(prompt + target, tok)
        assert len(ids) <= max_length, r
        # one token per letter, per phrase, per separator, the final "." and BOS/EOS
        letters = sum(len(w) for s in r["output"][:-1].split(corpus.SEPARATOR)
                      for w in s.split(next(p for p in corpus.PROSE.values() if p in s)))
        assert len(ids) == letters + 3 + 2 + 1 + 2
