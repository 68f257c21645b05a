"""The demo's pretraining corpus: plain prose stating the facts the instruction tasks need.

The paper fine-tunes pretrained LLMs: they already know what reversing or capitalising a word
means, and instruction tuning aligns that knowledge to the instruction format. The demo's base
model gets the same kind of start from this corpus. Each document follows one pseudo-word
through the three operations in a random order, in prose and with every intermediate result
written out ("naduk backwards is kudan. kudan in capitals is KUDAN. KUDAN with its first letter
moved to the end is UDANK."). There is no instruction template and no instruction phrase in it:
the tuned model must learn that "Reverse the word, then uppercase." asks for the last word of
such a chain, given only the first, without writing the steps out.

Words of the test split never occur in the corpus, so a correct test answer is computed, not
recalled. `CORPUS_VERSION` is part of the base model's cache key: bump it when the generator
changes what it writes for the same arguments.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from phased_jax.demo.tasks import OPS, WORD_LENGTHS, pseudo_word
from phased_jax.fileio import write_jsonl_atomic

CORPUS_VERSION = 1
PROSE = {  # operation -> the phrase between a word and its result (one token each, see below)
    "reverse": " backwards is ",
    "uppercase": " in capitals is ",
    "rotate": " with its first letter moved to the end is ",
}
SEPARATOR = ". "


def document(word: str, rng: random.Random) -> str:
    """One word through every operation once, in a random order, each result written out."""
    sentences, current = [], word
    for op in rng.sample(sorted(OPS), len(OPS)):
        result = OPS[op].apply(current)
        sentences.append(f"{current}{PROSE[op]}{result}")
        current = result
    return SEPARATOR.join(sentences) + "."


def build_corpus(path: str | Path, n_docs: int, exclude_words: Iterable[str], seed: int = 0
                 ) -> dict[str, Any]:
    """Write `n_docs` documents as JSONL records for the `text` template; same seed, same bytes.

    Returns {"path", "n_docs", "n_words"} (distinct starting words).
    """
    rng = random.Random(f"corpus-{seed}")
    excluded = set(exclude_words)
    rows, words = [], set()
    while len(rows) < n_docs:
        word = pseudo_word(rng, rng.choice(WORD_LENGTHS))
        if word in excluded:
            continue
        words.add(word)
        rows.append({"id": f"doc-{len(rows):06d}", "instruction": "document", "input": "",
                     "output": document(word, rng)})
    write_jsonl_atomic(Path(path), rows)
    return {"path": Path(path), "n_docs": n_docs, "n_words": len(words)}


def prose_phrases() -> list[str]:
    """The corpus's fixed phrases, each one token in the demo's tokenizer (like the prompt's)."""
    return [*PROSE.values(), SEPARATOR]
