"""Shared fixtures of the data tests: a small local tokenizer and record writers."""

import json
from pathlib import Path

import pytest

from phased_jax.data.pipeline import Batching, PreparedData, prepare
from phased_jax.data.records import Record
from phased_jax.data.toy_tokenizer import build_tokenizer

CORPUS = [
    "Give three tips for staying healthy.", "Eat a balanced diet and exercise regularly.",
    "Translate the sentence into French.", "The cat sat on the mat.", "User: Assistant:",
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request. ### Instruction: ### Input: ### Response:",
    "Summarize the following paragraph about water, rivers, oceans and rain in the city.",
] * 20


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A byte-level BPE with Llama's special ids, built once for the whole session."""
    return build_tokenizer(CORPUS, 400, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tokenizer_dir(tokenizer):
    return tokenizer.name_or_path


def make_records(n: int, seed: int = 0, with_input_every: int = 3) -> list[Record]:
    """Records of varied lengths and scores spread over [1, 5]."""
    import random

    rng = random.Random(seed)
    words = " ".join(CORPUS).split()
    out = []
    for i in range(n):
        instr = " ".join(rng.choices(words, k=rng.randint(2, 12)))
        inp = " ".join(rng.choices(words, k=rng.randint(1, 8))) if i % with_input_every == 0 else ""
        outp = " ".join(rng.choices(words, k=rng.randint(1, 30)))
        score = rng.choice([1.0, 1.0, 1.25, 2.0, 2.6, 3.25, 3.5, 4.0, 4.125, 5.0])
        out.append(Record(str(i), instr, inp, outp, score, f"mem:{i}"))
    return out


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def prepare_config(c, tokenizer=None) -> PreparedData:
    """`prepare` with a whole experiment config's sections, as the phase runner calls it."""
    return prepare(c.data, Batching.from_sections(c.train, c.data, c.seed), c.output_dir,
                   tokenizer)
