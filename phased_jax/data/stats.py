"""`phased-jax stats --config configs/X.py [--config.data.FIELD=VALUE ...]`: the paper's Table 1.

Prints, for the config's data, each difficulty stage (score range, size, mean difficulty, mean
tokens) and then the phases in training order, plus what validation skipped. Token counts use
the config's tokenizer (`data.tokenizer`) over instruction, input and output (a conversation's
every turn) without the template; without a tokenizer they are whitespace-separated words,
labelled as such. Conversation data adds two columns: the mean user and assistant turns per
conversation, and the assistant turns' tokens in all (what training puts loss on, less the
template's end-of-turn tokens). A phase with no records is an error (exit 1) after the table,
as it is for `phased-jax train`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from phased_jax.config_cli import parse_config_argv
from phased_jax.data.phases import (
    Phase,
    build_phases,
    check_phases,
    config_phases,
    stage_bounds,
    stratify,
)
from phased_jax.data.records import Record, read_config_records
from phased_jax.data.splits import make_splits
from phased_jax.data.tokens import load_tokenizer
from phased_jax.formats import user_text
from phased_jax.local_paths import check_stats
from phased_jax.score.scale import PAPER_SHARES, histogram, suggest_thresholds

USAGE = "usage: phased-jax stats --config CONFIG_FILE [--config.data.FIELD=VALUE ...]\n"


def _count(texts: list[str], tokenizer: Any) -> np.ndarray:
    if tokenizer is None:
        return np.array([len(t.split()) for t in texts], np.int64)
    if not texts:
        return np.zeros(0, np.int64)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.array([len(x) for x in ids], np.int64)


def token_counts(records: Sequence[Record], tokenizer: Any) -> np.ndarray:
    return _count([("\n".join(t.content for t in r.messages) if r.messages else
                    user_text(r.instruction, r.input) + "\n" + r.output) for r in records],
                  tokenizer)


def assistant_counts(records: Sequence[Record], tokenizer: Any) -> np.ndarray:
    """Tokens of each record's answers: every assistant turn of a conversation."""
    return _count(["\n".join(t.content for t in r.turns if t.role == "assistant")
                   for r in records], tokenizer)


@dataclass(frozen=True)
class Counts:
    """Per record id: tokens, and for conversation data turns and assistant tokens."""

    tokens: dict[str, int]
    turns: dict[str, int] | None = None
    answer_tokens: dict[str, int] | None = None


def _row(name: str, info: str, recs: Sequence[Record], counts: Counts) -> str:
    scores = [r.score for r in recs if r.score is not None]
    mean_s = f"{np.mean(scores):.2f}" if scores else "-"
    mean_t = f"{np.mean([counts.tokens[r.id] for r in recs]):.1f}" if recs else "-"
    row = f"{name:<12} {info:<16} {len(recs):>8,} {mean_s:>10} {mean_t:>10}"
    if counts.turns is not None and counts.answer_tokens is not None:
        turns = f"{np.mean([counts.turns[r.id] for r in recs]):.1f}" if recs else "-"
        row += f" {turns:>10} {sum(counts.answer_tokens[r.id] for r in recs):>14,}"
    return row


def table(records: Sequence[Record], cfg: Any, tokenizer: Any, tokenizer_name: str) -> str:
    d = cfg.data
    ids = [r.id for r in records]
    counts = Counts(dict(zip(ids, token_counts(records, tokenizer).tolist(), strict=True)))
    talk = any(r.messages for r in records)
    if talk:
        turns = [sum(t.role != "system" for t in r.turns) for r in records]
        counts = Counts(counts.tokens, dict(zip(ids, turns, strict=True)), dict(zip(
            ids, assistant_counts(records, tokenizer).tolist(), strict=True)))
    unit = f"tokens ({tokenizer_name})" if tokenizer is not None else "whitespace words"
    def head(a: str, b: str) -> str:
        return (f"{a:<12} {b:<16} {'size':>8} {'mean diff':>10} {'mean len':>10}"
                + (f" {'mean turns':>10} {'answer tokens':>14}" if talk else ""))

    lines = [f"mean len = {unit} of instruction + input + output" + (
        " (of every turn); mean turns = user and assistant turns per conversation; answer "
        f"tokens = {unit} of the assistant turns in all" if talk else ""), ""]
    if all(r.score is not None for r in records):
        stages = stratify(records, tuple(d.thresholds), int(d.quantiles))
        lines += ["difficulty stages" + (f" ({d.quantiles} quantiles)" if d.quantiles else ""),
                  head("stage", "scores")]
        bounds = stage_bounds(tuple(d.thresholds)) if not d.quantiles else None
        for k, s in enumerate(stages):
            if bounds:
                lo, hi = bounds[k]
                info = f"[{lo:g}, {hi:g}]" if k == len(stages) - 1 else f"[{lo:g}, {hi:g})"
            else:
                sc = [r.score for r in s]
                info = f"[{min(sc):g}, {max(sc):g}]" if sc else "-"
            lines.append(_row(str(k + 1), info, s, counts))
        lines.append("")
    phases = build_phases(records, d.order, tuple(d.thresholds), int(d.quantiles), cfg.seed)
    lines += [f"phases in training order (data.order={d.order!r})",
              head("phase", "stages")]
    for i, ph in enumerate(phases):
        stages = "+".join(map(str, ph.stages)) if ph.stages else "all"
        lines.append(_row(f"{i + 1}", f"{ph.name} ({stages})" if ph.name != stages else stages,
                          ph.records, counts))
    lines.append(_row("total", "", records, counts))
    if all(r.score is not None for r in records) or d.order.strip() == "oneoff":
        lines += ["", *split_lines(records, phases, cfg, counts, unit)]
    return "\n".join(lines)


def split_lines(records: Sequence[Record], phases: Sequence[Phase], cfg: Any,
                counts: Counts, unit: str) -> list[str]:
    """What `train` holds out per stage and replays per phase (the same draws), and the run's
    length against data.replay=0."""
    d = cfg.data
    splits = make_splits(records, phases, d, cfg.seed)
    lines = []
    if splits.stages:
        lines.append(f"held out for the forgetting matrix (data.eval_fraction={d.eval_fraction:g}): "
                     + ", ".join(f"stage {s.name} {len(s.heldout_ids):,} of {s.records:,}"
                                 for s in splits.stages))
    replay = float(d.get("replay", 0.0))
    if replay > 0:
        lines.append(f"replay (data.replay={replay:g}): " + ", ".join(
            f"phase {k + 1} +{len(dr.ids):,} of {dr.available:,} earlier"
            + (" (all there are)" if dr.short else "")
            for k, dr in enumerate(splits.replay) if k))
    epochs = int(cfg.train.epochs_per_phase)
    tokens = counts.tokens
    without = sum(tokens[i] for ids in splits.train_ids for i in ids) * epochs
    with_replay = without + sum(tokens[i] for dr in splits.replay for i in dr.ids) * epochs
    lines.append(f"training {unit} over {epochs} epoch(s) a phase: {with_replay:,}"
                 + (f", {100 * (with_replay / max(without, 1) - 1):+.1f}% against data.replay=0 "
                    f"({without:,})" if replay > 0 else ""))
    return lines


def score_summary(scores: Sequence[float]) -> str:
    """The score histogram and the thresholds that give the paper's stage shares, whatever the
    scorer (GPT-4's steps of 0.5 or `phased-jax score`'s continuous ranks)."""
    thresholds, got = suggest_thresholds(scores)
    shares = "/".join(f"{100 * s:.0f}%" for s in PAPER_SHARES)
    gives = "/".join(f"{100 * s:.1f}%" for s in got)
    return "\n".join(["score histogram", *histogram(scores), "",
                      f"thresholds for the paper's stage shares ({shares} by count): "
                      f"--config.data.thresholds='({', '.join(f'{t:g}' for t in thresholds)})' "
                      f"gives {gives}"])


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    fv = parse_config_argv(argv, "phased-jax stats", USAGE + __doc__.split("\n\n", 1)[1])
    if fv is None:
        return 0
    cfg = fv.config
    check_stats(cfg)  # a missing path or an unreachable Hub: before any data is read
    records, invalid = read_config_records(cfg.data)
    tokenizer = load_tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer else None
    print(f"data: {', '.join(map(str, cfg.data.paths))}")
    print(invalid.summary())
    print()
    print(table(records, cfg, tokenizer, cfg.data.tokenizer))
    if all(r.score is not None for r in records):
        print()
        print(score_summary([float(r.score) for r in records]))
    # After the table, which shows where the data's scores lie: an empty phase fails here as
    # it would in `train`, with the fix.
    check_phases(config_phases(records, cfg.data, cfg.seed), records, cfg.data)
    return 0
