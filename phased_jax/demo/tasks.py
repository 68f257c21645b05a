"""The demo's bundled data: generated word instructions of graded difficulty.

Real instruction data and a GPT-4 difficulty rater do not fit in a CPU demo, so the demo makes
its own, sized for a tiny Transformer. Each instruction is a chain of one to three operations
on a pseudo-word ("Reverse the word, then uppercase, then move the first letter to the end."),
led by its family's operation (`reverse`, `rotate`, `uppercase`). Hard items compose the easy
ones: a phase-3 chain is phase-1 steps applied in sequence, so the curriculum has something to
build on, and every family has easy and hard items, so it appears in every phase.

The score (the stand-in for GPT-4's 1-5 rating) is a formula of the work plus a rater's noise:
1 + 0.9 per extra step + 0.2 per letter beyond three + a little for the harder steps, plus
Gaussian noise (sd 1.0). Scores are fractional (1.15, 2.6, 4.05, ...). The noise matters: like
GPT-4's ratings, it makes the phases overlap (phase 1 is mostly single steps but holds some
chains; phase 3 is mostly three-step chains but holds some single steps), as the paper's
phases do. Items are drawn per phase and family until the paper's thresholds
[1, 1.5) / [1.5, 3.5) / [3.5, 5] hold the paper's proportions (Table 1: 58% / 28% / 13%).

Words are pronounceable pseudo-words (strictly alternating consonants and vowels), so there are
enough distinct inputs to keep the test split disjoint from train, no input can contain an
instruction phrase (each is one token, see `prompt_phrases`), and every answer is computed,
never memorised from a list. Answers are at most 8 characters, so exact match is meaningful.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phased_jax.fileio import write_jsonl_atomic

THRESHOLDS = (1.5, 3.5)  # the paper's phase boundaries on the 1-5 difficulty scale
PAPER_PHASE_SIZES = (30.3, 14.7, 6.8)  # Alpaca 52K per phase, thousands (paper Table 1)
TEST_SET = "demo"
DEFAULT_N_TRAIN = 18000
DEFAULT_N_TEST = 300

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"

# One example: (instruction, input, output, difficulty).
Example = tuple[str, str, str, float]


def phase_of(score: float, thresholds: tuple[float, ...] = THRESHOLDS) -> int:
    """1-based phase of a difficulty score: phase k holds [t_{k-1}, t_k)."""
    return 1 + sum(score >= t for t in thresholds)


def pseudo_word(rng: random.Random, n: int) -> str:
    """A pronounceable lowercase word of `n` letters, alternating consonants and vowels."""
    start = rng.random() < 0.7  # most words start with a consonant
    return "".join(
        rng.choice(CONSONANTS if (i % 2 == 0) == start else VOWELS) for i in range(n)
    )


# --- word operations and their chains ---------------------------------------------------

@dataclass(frozen=True)
class Op:
    name: str
    lead: str  # the instruction's first step
    then: str  # a later step
    cost: float  # extra difficulty of the step over uppercasing, per use
    apply: Callable[[str], str]


OPS = {
    "reverse": Op("reverse", "Reverse the word", ", then reverse", 0.05, lambda w: w[::-1]),
    "rotate": Op("rotate", "Move the first letter to the end", ", then move the first letter to "
                 "the end", 0.1, lambda w: w[1:] + w[0]),
    "uppercase": Op("uppercase", "Uppercase the word", ", then uppercase", 0.0, str.upper),
}
WORD_LENGTHS = (3, 4, 5, 6, 7, 8)
PER_LETTER, PER_STEP = 0.2, 0.9  # difficulty of one more letter, one more step
RATER_NOISE = 1.0  # standard deviation of the rating around the work formula


def chain_instruction(ops: Sequence[str]) -> str:
    return OPS[ops[0]].lead + "".join(OPS[o].then for o in ops[1:]) + "."


def rated(work: float, rng: random.Random) -> float:
    """A 1-5 rating of an item of the given work: the formula plus a rater's noise, so the
    phases overlap as noisy GPT-4 ratings make them overlap."""
    return min(5.0, max(1.0, work + rng.gauss(0.0, RATER_NOISE)))


def chain_item(ops: Sequence[str], word: str) -> Example:
    """The chain applied in order, and the work formula of the module docstring."""
    out = word
    for o in ops:
        out = OPS[o].apply(out)
    work = (1.0 + PER_LETTER * (len(word) - 3) + PER_STEP * (len(ops) - 1)
            + sum(OPS[o].cost for o in ops))
    return chain_instruction(ops), word, out, work


def word_family(lead: str) -> Callable[[random.Random], Example]:
    """Chains of one to three distinct operations led by `lead`, on a 3-8 letter word."""
    def make(rng: random.Random) -> Example:
        ops = [lead] + rng.sample([o for o in OPS if o != lead], rng.randint(0, 2))
        instruction, word, out, work = chain_item(ops, pseudo_word(rng, rng.choice(WORD_LENGTHS)))
        return instruction, word, out, rated(work, rng)
    return make


@dataclass(frozen=True)
class Family:
    name: str
    make: Callable[[random.Random], Example]  # an item of any difficulty; phases filter


FAMILIES: tuple[Family, ...] = (
    Family("reverse", word_family("reverse")),
    Family("rotate", word_family("rotate")),
    Family("uppercase", word_family("uppercase")),
)
FAMILY_BY_NAME = {f.name: f for f in FAMILIES}


def _split(total: int, weights: Iterable[float]) -> list[int]:
    """`total` split in proportion to `weights` by largest remainder (sums exactly to total)."""
    w = list(weights)
    raw = [total * x / sum(w) for x in w]
    counts = [int(r) for r in raw]
    for i in sorted(range(len(w)), key=lambda i: counts[i] - raw[i])[: total - sum(counts)]:
        counts[i] += 1
    return counts


def phase_counts(n: int, phase_weights: Iterable[float],
                 families: Sequence[Family] = FAMILIES) -> dict[tuple[str, int], int]:
    """Items per (family, phase): `n` split over phases by `phase_weights`, then evenly over
    the families."""
    out: dict[tuple[str, int], int] = {}
    for phase, n_phase in enumerate(_split(n, phase_weights), 1):
        for f, k in zip(families, _split(n_phase, [1] * len(families)), strict=True):
            out[f.name, phase] = k
    return out


def _generate(family: Family, phase: int, n: int, rng: random.Random,
              taken: set[tuple[str, str]], split: str) -> list[dict[str, Any]]:
    """`n` records of one family and phase whose (instruction, input) is not in `taken`."""
    records = []
    tries = 0
    while len(records) < n:
        tries += 1
        if tries > 500 * n + 5000:
            raise ValueError(f"task family {family.name!r} has too few distinct phase-{phase} "
                             f"inputs for {n} items; ask for a smaller data set")
        instruction, inp, output, score = family.make(rng)
        score = round(score, 3)  # as written, so the file's phases are the ones drawn
        if phase_of(score) != phase or (instruction, inp) in taken:
            continue
        if not 1.0 <= score <= 5.0:
            raise AssertionError(f"{family.name}: score {score} outside [1, 5]")
        taken.add((instruction, inp))
        records.append({
            "id": f"{split}-{family.name}-{phase}{len(records):05d}",
            "instruction": instruction,
            "input": inp,
            "output": output,
            "score": score,
            "task": family.name,
        })
    return records


def phase_stats(records: Iterable[Mapping[str, Any]]) -> list[dict[str, float]]:
    """Per phase: size and mean difficulty (the columns of the paper's Table 1)."""
    by_phase: dict[int, list[float]] = {1: [], 2: [], 3: []}
    for r in records:
        by_phase[phase_of(float(r["score"]))].append(float(r["score"]))
    return [{"phase": p, "n": len(s), "mean_score": sum(s) / len(s) if s else float("nan")}
            for p, s in sorted(by_phase.items())]


def select_families(names: Sequence[str] | None) -> tuple[Family, ...]:
    """The named families (all when None), in their usual order."""
    if names is None:
        return FAMILIES
    unknown = sorted(set(names) - FAMILY_BY_NAME.keys())
    if unknown:
        raise ValueError(f"unknown task families {unknown}; choose from {sorted(FAMILY_BY_NAME)}")
    if not names:
        raise ValueError("choose at least one task family")
    return tuple(f for f in FAMILIES if f.name in names)


def build_dataset(out_dir: str | Path, n_train: int = DEFAULT_N_TRAIN,
                  n_test: int = DEFAULT_N_TEST, seed: int = 0,
                  families: Sequence[str] | None = None) -> dict[str, Any]:
    """Write `train.jsonl` and `test.jsonl` (scored JSONL) under `out_dir`; same seed, same bytes.

    Train is split over phases in the paper's Table 1 proportions, then evenly over the
    families. Test is split evenly over phases and families (so each difficulty band gets a
    third), because the per-band win rates need enough hard items to mean something. Test
    inputs never occur in train. Records carry `task` (the family) besides the scored-JSONL
    fields; test records also carry `test_set` = "demo". `families` picks a subset.

    Returns {"train", "test": paths, "train_phase_counts", "test_phase_counts": [n1, n2, n3],
    "train_phases": phase_stats(train), "families": [names]}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    taken: set[tuple[str, str]] = set()
    fams = select_families(families)
    test_counts = phase_counts(n_test, [1, 1, 1], fams)
    train_counts = phase_counts(n_train, PAPER_PHASE_SIZES, fams)
    # Test first, so its inputs are reserved before train is drawn.
    test = [dict(r, test_set=TEST_SET) for p in (1, 2, 3) for f in fams
            for r in _generate(f, p, test_counts[f.name, p], rng, taken, "test")]
    train = [r for p in (1, 2, 3) for f in fams
             for r in _generate(f, p, train_counts[f.name, p], rng, taken, "train")]
    rng.shuffle(train)  # the phase pipeline re-stratifies; a mixed file reads like real data
    paths = {"train": out / "train.jsonl", "test": out / "test.jsonl"}
    write_jsonl_atomic(paths["train"], train)
    write_jsonl_atomic(paths["test"], test)
    train_phases = phase_stats(train)
    return {
        **paths,
        "train_phase_counts": [int(s["n"]) for s in train_phases],
        "test_phase_counts": [int(s["n"]) for s in phase_stats(test)],
        "train_phases": train_phases,
        "families": [f.name for f in fams],
    }


def texts_for_tokenizer(records: Iterable[Mapping[str, Any]],
                        template: str = "User: {instruction}\n{input}\nAssistant: {output}"
                        ) -> list[str]:
    """Strings to train a tokenizer on: each record rendered with the prompt's words."""
    return [template.format(instruction=r["instruction"], input=r.get("input", ""),
                            output=r["output"]) for r in records]


def prompt_phrases() -> list[str]:
    """The template's and instructions' fixed phrases, each to be one token in the demo.

    At one token per character the prompt words would be most of every sequence (and of the
    compute); as whole-phrase tokens an example is under 25 tokens. Inputs and answers stay one
    character per token, which is what reversing and sorting need. No phrase can occur inside
    an input: inputs are lowercase alternating consonant-vowel words or digits.
    """
    return (["User: ", "Assistant: "]
            + [o.lead for o in OPS.values()] + [o.then for o in OPS.values()])

