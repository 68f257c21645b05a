"""The demo data set: deterministic, correct answers, the paper's phase proportions."""

import json

import pytest

from phased_jax.demo import tasks
from phased_jax.fileio import read_jsonl


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    info = tasks.build_dataset(out, seed=0)
    return info, read_jsonl(info["train"]), read_jsonl(info["test"])


PHRASES = {"Reverse the word": "r", ", then reverse": "r", "Uppercase the word": "u",
           ", then uppercase": "u", "Move the first letter to the end": "m",
           ", then move the first letter to the end": "m"}


def steps_of(instruction: str) -> list[str]:
    """The chain of an instruction as step letters, parsed from its text alone."""
    assert instruction.endswith("."), instruction
    rest, steps = instruction[:-1], []
    while rest:
        phrase = max((p for p in PHRASES if rest.startswith(p)), key=len)
        steps.append(PHRASES[phrase])
        rest = rest[len(phrase):]
    return steps


def expected_answer(instruction: str, inp: str) -> str:
    """Each answer recomputed from the instruction text and the input alone."""
    out = inp
    for step in steps_of(instruction):
        out = {"r": out[::-1], "u": out.upper(), "m": out[1:] + out[:1]}[step]
    return out


def test_deterministic_for_a_seed(tmp_path):
    a = tasks.build_dataset(tmp_path / "a", n_train=300, n_test=60, seed=7)
    b = tasks.build_dataset(tmp_path / "b", n_train=300, n_test=60, seed=7)
    c = tasks.build_dataset(tmp_path / "c", n_train=300, n_test=60, seed=8)
    for split in ("train", "test"):
        assert a[split].read_bytes() == b[split].read_bytes()
        assert a[split].read_bytes() != c[split].read_bytes()
    assert not list(tmp_path.glob("*/.*.tmp*")), "temporary files left behind"


def test_every_answer_is_right(built):
    _, train, test = built
    for r in train + test:
        assert r["output"] == expected_answer(r["instruction"], r["input"]), r
        assert 3 <= len(r["output"]) <= 8


def test_records_are_scored_jsonl(built):
    info, train, test = built
    for r in train + test:
        assert isinstance(r["id"], str) and isinstance(r["score"], float)
        assert 1.0 <= r["score"] <= 5.0
        assert r["task"] in tasks.FAMILY_BY_NAME
    assert all(r["test_set"] == "demo" for r in test)
    assert len({r["id"] for r in train + test}) == len(train) + len(test)
    # fractional scores, not a handful of levels
    assert len({r["score"] for r in train}) >= 1000
    # one JSON object per line, nothing else
    lines = info["train"].read_text().splitlines()
    assert len(lines) == len(train) and all(json.loads(line) for line in lines)


def test_phase_proportions_are_the_papers(built):
    info, train, _ = built
    paper = [s / sum(tasks.PAPER_PHASE_SIZES) for s in tasks.PAPER_PHASE_SIZES]  # .58/.28/.13
    counts = [sum(tasks.phase_of(r["score"]) == p for r in train) for p in (1, 2, 3)]
    assert counts == info["train_phase_counts"] and sum(counts) == tasks.DEFAULT_N_TRAIN
    for got, want in zip(counts, paper, strict=True):
        assert abs(got / len(train) - want) < 0.01
    means = [s["mean_score"] for s in info["train_phases"]]
    assert means == sorted(means)


def test_test_split_covers_every_band_and_family_and_is_held_out(built):
    info, train, test = built
    assert info["test_phase_counts"] == [100, 100, 100]
    for p in (1, 2, 3):
        assert {r["task"] for r in test if tasks.phase_of(r["score"]) == p} == set(
            tasks.FAMILY_BY_NAME)
    seen = {(r["instruction"], r["input"]) for r in train}
    assert not [r for r in test if (r["instruction"], r["input"]) in seen]


def test_every_family_in_every_phase_and_harder_means_more_steps(built):
    """The curriculum builds: each family in each phase, later phases longer chains."""
    _, train, _ = built
    mean_steps = []
    for p in (1, 2, 3):
        phase = [r for r in train if tasks.phase_of(r["score"]) == p]
        assert {r["task"] for r in phase} == set(tasks.FAMILY_BY_NAME)
        assert {len(steps_of(r["instruction"])) for r in phase} == {1, 2, 3}  # phases overlap
        mean_steps.append(sum(len(steps_of(r["instruction"])) for r in phase) / len(phase))
    assert mean_steps == sorted(mean_steps) and mean_steps[2] - mean_steps[0] > 1


def test_texts_for_tokenizer(built):
    _, train, _ = built
    r = train[0]
    assert tasks.texts_for_tokenizer([r]) == [
        f"User: {r['instruction']}\n{r['input']}\nAssistant: {r['output']}"]


def test_fits_the_demo_model_with_char_level_answers(built):
    """With the demo's tokenizer, examples fit max_length and answers are one token a letter."""
    build_tokenizer = pytest.importorskip("phased_jax.data.toy_tokenizer").build_tokenizer
    from phased_jax.data.templates import encode_parts, render
    from phased_jax.demo.config import BYTE_VOCAB, TOKENIZER_VOCAB, demo_config
    from phased_jax.demo.corpus import prose_phrases

    info, train, test = built
    tok = build_tokenizer(tasks.texts_for_tokenizer(train), BYTE_VOCAB, info["train"].parent / "tok")
    tok.add_tokens(tasks.prompt_phrases() + prose_phrases())
    assert len(tok) == TOKENIZER_VOCAB
    max_length = demo_config().data.max_length
    for r in train + test:
        prompt, target = render(r["instruction"], r["input"], r["output"], "authors")
        assert len(encode_parts(prompt + target, tok)) <= max_length, r
        assert len(encode_parts(target, tok)) == len(r["output"]) + 1  # letters and EOS


def test_scales_to_larger_budgets(tmp_path):
    """Enough distinct inputs for a 40k-item set (a faster machine's budget)."""
    info = tasks.build_dataset(tmp_path, n_train=40000, n_test=600, seed=1)
    assert sum(info["train_phase_counts"]) == 40000 and info["test_phase_counts"] == [200] * 3


def test_family_subset(tmp_path):
    info = tasks.build_dataset(tmp_path, n_train=600, n_test=60, families=["reverse", "rotate"])
    test = read_jsonl(info["test"])
    assert info["families"] == ["reverse", "rotate"]
    assert info["test_phase_counts"] == [20, 20, 20] and {r["task"] for r in test} == set(info["families"])
    with pytest.raises(ValueError, match="unknown"):
        tasks.build_dataset(tmp_path, families=["reverse", "dance"])
