"""A config's data, end to end: records -> phases -> tokenised examples -> a loader per phase.

`prepare(config.data, batching, output_dir)` is what the phase runner calls once per process; every process reads and
tokenises the whole data (cached on disk), then takes its own rows from `PhaseLoader`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phased_jax.data.loader import PhaseLoader
from phased_jax.data.phases import Phase, check_phases, config_phases
from phased_jax.data.records import InvalidReport, Record, read_config_records, read_records
from phased_jax.data.splits import Draw, Stage, make_splits, replay_note
from phased_jax.data.tokens import TokenizedExamples, TokenReport, load_tokenizer, tokenize_cached
from phased_jax.errors import ConfigError, DataError
from phased_jax.fileio import write_text_atomic

REPORT_NAME = "data_report.json"


@dataclass(frozen=True)
class Batching:
    """How a run turns examples into steps, the same for every phase: the `train` section's
    batch, epochs and step cap, the `data` section's packing and shuffle, the run's seed."""

    global_batch: int
    epochs: int
    seed: int
    packing: bool = False
    shuffle: bool = True
    max_steps: int = -1

    @classmethod
    def from_sections(cls, train_cfg: Any, data_cfg: Any, seed: int) -> Batching:
        return cls(int(train_cfg.global_batch), int(train_cfg.epochs_per_phase), int(seed),
                   bool(data_cfg.packing), bool(data_cfg.shuffle),
                   int(train_cfg.max_steps_per_phase))

    def loader(self, examples: TokenizedExamples, phase_index: int, process_index: int = 0,
               process_count: int = 1, *, evaluation: bool = False) -> PhaseLoader:
        """A phase's loader; `evaluation`: one pass in read order, no step cap."""
        return PhaseLoader(examples, self.global_batch, 1 if evaluation else self.epochs,
                           self.seed, phase_index, process_index, process_count,
                           packing=self.packing, shuffle=self.shuffle and not evaluation,
                           max_steps=-1 if evaluation else self.max_steps)


@dataclass
class PhaseData:
    """One phase in training order: its own training examples plus those it replays."""

    index: int  # position in training order, 0-based; the loader's seed uses it
    phase: Phase
    examples: TokenizedExamples  # own examples first, then the replayed ones
    own: int = 0  # how many of `examples` are the phase's own
    draw: Draw | None = None  # the replayed records (`data.replay`)

    @property
    def replayed(self) -> int:
        return len(self.examples) - self.own

    def tokens(self, epochs: int) -> tuple[int, int]:
        """(own, replayed) unpadded tokens the phase trains on over `epochs` epochs."""
        lengths = self.examples.lengths
        return int(lengths[:self.own].sum()) * epochs, int(lengths[self.own:].sum()) * epochs

    def loader(self, batching: Batching, process_index: int = 0, process_count: int = 1
               ) -> PhaseLoader:
        return batching.loader(self.examples, self.index, process_index, process_count)


@dataclass(frozen=True)
class StageEval:
    """A stage's held-out examples: one column of the forgetting matrix."""

    stage: Stage
    examples: TokenizedExamples


@dataclass
class PreparedData:
    phases: list[PhaseData]
    records: list[Record]
    invalid: InvalidReport
    tokens: TokenReport
    tokenizer: Any
    eval_examples: TokenizedExamples | None = None  # from data.eval_path
    report_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    stage_evals: list[StageEval] = field(default_factory=list)  # data.eval_fraction
    epochs: int = 1

    def token_totals(self) -> tuple[int, int]:
        """(with replay, without) unpadded tokens of the whole run."""
        parts = [p.tokens(self.epochs) for p in self.phases]
        return sum(a + b for a, b in parts), sum(a for a, _ in parts)

    def summary(self) -> str:
        lines = [self.invalid.summary()]
        if self.tokens.truncated or self.tokens.skipped:
            dropped = (f" ({self.tokens.turns_dropped} trailing assistant turns dropped)"
                       if self.tokens.turns_dropped else "")
            reasons = ", ".join(sorted({s["reason"] for s in self.tokens.skipped}))
            lines.append(f"tokenised: {self.tokens.truncated} truncated to max_length{dropped}, "
                         f"{len(self.tokens.skipped)} skipped" + (f" ({reasons})" if reasons else ""))
        if self.stage_evals:
            lines.append("held out for the forgetting matrix: " + ", ".join(
                f"stage {s.stage.name} {len(s.examples)}" for s in self.stage_evals))
        lines += [f"phase {p.index + 1} ({p.phase.name}): {p.own} examples"
                  + (f" + {p.replayed} replayed from earlier phases" if p.replayed else "")
                  for p in self.phases]
        with_replay, without = self.token_totals()
        if with_replay != without:
            lines.append(f"run: {with_replay:,} tokens over its epochs, "
                         f"{100 * (with_replay / max(without, 1) - 1):+.1f}% against "
                         f"data.replay=0 ({without:,})")
        return "\n".join(lines + self.notes)


def _phase_report(p: PhaseData, epochs: int) -> dict[str, Any]:
    own_tokens, replay_tokens = p.tokens(epochs)
    draw = p.draw or Draw((), p.own, 0, 0)
    return {"index": p.index, "name": p.phase.name, "records": p.phase.size,
            "examples": p.own, "replayed_examples": p.replayed,
            "replay": {"wanted": draw.wanted, "drawn": len(draw.ids), "available": draw.available},
            "tokens": own_tokens, "replayed_tokens": replay_tokens,
            "mean_score": None if np.isnan(p.phase.mean_score) else p.phase.mean_score}


def _heldout_report(d: Any, seed: int, stage_evals: list[StageEval]) -> dict[str, Any]:
    """What `phased-jax compare` checks two runs agree on: each stage's held-out record ids."""
    return {"fraction": float(d.eval_fraction), "seed": int(seed),
            "stages": [{"stage": s.stage.name, "label": s.stage.label, "records": s.stage.records,
                        "metric": s.stage.metric, "examples": len(s.examples),
                        "ids": sorted(s.stage.heldout_ids)} for s in stage_evals]}


def cache_dir_of(data_cfg: Any, output_dir: str | Path) -> str:
    return data_cfg.cache_dir or os.path.join(output_dir, "token_cache")


def _check_steps(data: PhaseData, tokenised: int, d: Any, batching: Batching,
                 heldout: frozenset[str]) -> None:
    """Raise a DataError if a phase with records would run 0 steps, with the numbers.

    Why: the runner would find out only when the phase starts, after the phases before it.
    """
    steps = data.loader(batching).steps if len(data.examples) else 0
    if steps:
        return
    ph = data.phase
    held = sum(r.id in heldout for r in ph.records)
    raise DataError(
        f"phase {data.index + 1} ({ph.label}) has {ph.size} records but {len(data.examples)} "
        f"training examples, so 0 steps (train.global_batch={batching.global_batch}, "
        f"train.epochs_per_phase={batching.epochs}): {ph.size - held - tokenised} skipped because "
        f"the prompt fills data.max_length={d.max_length}, {held} held out by "
        f"data.eval_fraction={d.eval_fraction}; raise data.max_length, lower "
        "data.eval_fraction or change data.order/data.thresholds")


def prepare(d: Any, batching: Batching, output_dir: str | Path, tokenizer: Any = None,
            write_report: bool = True) -> PreparedData:
    """Read, validate, stratify, order and tokenise the `data` section `d`; write
    `<output_dir>/data_report.json`.

    Every phase must have records and steps under `batching` (a DataError otherwise), so a run
    that cannot finish fails here, before its first step, and not when a later phase starts.
    """
    seed = batching.seed
    if tokenizer is None and not d.tokenizer:
        raise ConfigError("data.tokenizer is empty: set it to a local HF tokenizer directory")
    records, invalid = read_config_records(d)
    phases = config_phases(records, d, seed)
    check_phases(phases, records, d)  # before loading a tokenizer or tokenising: in seconds
    if tokenizer is None:
        tokenizer = load_tokenizer(d.tokenizer)
    examples, tok_report, _ = tokenize_cached(records, d.template, tokenizer, d.max_length,
                                              cache_dir_of(d, output_dir))
    splits = make_splits(records, phases, d, seed)
    heldout = splits.heldout
    out, notes = [], []
    for i, ph in enumerate(phases):
        own = examples.select(splits.train_ids[i])
        draw = splits.replay[i]
        data = PhaseData(i, ph, examples.select(splits.phase_ids(i)), len(own), draw)
        _check_steps(data, len(own), d, batching, heldout)
        if draw.short:
            notes.append(replay_note(i, draw, float(d.replay)))
        out.append(data)
    stage_evals = [StageEval(s, examples.select(s.heldout_ids)) for s in splits.stages]
    eval_examples = None
    if d.eval_path:
        eval_records, eval_invalid = read_records(d.eval_path, d.format, d.fields.to_dict(),
                                                  d.on_invalid, d.get("hf_split", "train"),
                                                  d.get("max_record_bytes"))
        invalid.extend(eval_invalid)
        eval_examples, eval_tok, _ = tokenize_cached(eval_records, d.template, tokenizer,
                                                     d.max_length, cache_dir_of(d, output_dir))
        tok_report.truncated += eval_tok.truncated
        tok_report.turns_dropped += eval_tok.turns_dropped
        tok_report.skipped += eval_tok.skipped
    prepared = PreparedData(out, records, invalid, tok_report, tokenizer, eval_examples,
                            notes=notes, stage_evals=stage_evals, epochs=batching.epochs)
    if write_report:
        path = Path(output_dir) / REPORT_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {"invalid": invalid.to_dict(), "tokens": tok_report.to_dict(),
                "phases": [_phase_report(p, prepared.epochs) for p in out],
                "run_tokens": dict(zip(("with_replay", "without_replay"),
                                       prepared.token_totals(), strict=True)),
                "heldout": _heldout_report(d, seed, stage_evals)}
        write_text_atomic(path, json.dumps(body, indent=1, ensure_ascii=False) + "\n")
        prepared.report_path = path
    return prepared
