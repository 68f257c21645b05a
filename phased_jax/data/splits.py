"""Which records a run holds out per difficulty stage, and which it replays in later phases.

Held out (`data.eval_fraction`): a fraction of each *stage*, the records with the smallest
hash of (seed, record id). Neither `data.order` nor the read order enters it, so a phased, a
one-off, a reverse and a random-stages run on the same data and seed hold out the same records
and their eval losses compare item for item. The stages are the score stages (`stratify`);
unscored data (trainable one-off only) is one stage, `all`.

Replay (`data.replay`): phase k > 1 also trains on round(replay * n_k) records drawn without
replacement from the earlier phases' *training* records (never held-out ones), n_k being phase
k's own training records; all of them where fewer exist (`Draw.short` says so). The draw is
seeded by (seed, phase index) and fixed here, before tokenising; the phase's loader then
shuffles the replayed examples in with the phase's own.

Both work on record ids, so `phased-jax stats` (no template, no tokenising) and the training
pipeline draw exactly the same records.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from phased_jax.data.phases import Phase, stage_text, stratify
from phased_jax.data.records import Record

REPLAY_SALT = 0x4E91A7


@dataclass(frozen=True)
class Stage:
    """A difficulty stage as the forgetting matrix sees it: `name` is "1", "2", ... or "all"."""

    name: str
    label: str  # "[1, 1.5)", "quantile stage 2 of 4", "all records"
    records: int
    heldout_ids: tuple[str, ...]  # sorted by the holding-out hash

    @property
    def metric(self) -> str:
        return metric_name(self.name)


@dataclass(frozen=True)
class Draw:
    """The records replayed in one phase."""

    ids: tuple[str, ...]
    own: int  # n_k: the phase's own training records
    wanted: int  # round(replay * n_k)
    available: int  # the earlier phases' training records

    @property
    def short(self) -> bool:
        return len(self.ids) < self.wanted


@dataclass(frozen=True)
class Splits:
    stages: tuple[Stage, ...]  # empty when nothing is held out
    train_ids: tuple[tuple[str, ...], ...]  # per phase, in training order: its own records
    replay: tuple[Draw, ...]  # per phase (phase 1's is empty)

    @property
    def heldout(self) -> frozenset[str]:
        return frozenset(i for s in self.stages for i in s.heldout_ids)

    def phase_ids(self, k: int) -> list[str]:
        """Phase k's training records: its own, then its replayed ones."""
        return [*self.train_ids[k], *self.replay[k].ids]


def metric_name(stage: str) -> str:
    """A stage's eval loss in metrics.jsonl, TensorBoard and W&B (as `eval/<name>`)."""
    return f"stage{stage}_loss" if stage[0].isdigit() else f"{stage}_loss"


def _hash(seed: int, record_id: str) -> int:
    digest = hashlib.blake2b(f"{seed}\0{record_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def eval_stages(records: Sequence[Record], data_cfg: Any) -> list[tuple[str, str, list[Record]]]:
    """(name, label, records) of each stage the held-out split is drawn from."""
    if any(r.score is None for r in records):
        return [("all", "all records", list(records))]
    thresholds, quantiles = tuple(data_cfg.thresholds), int(data_cfg.quantiles)
    stages = stratify(records, thresholds, quantiles)
    return [(str(k + 1), stage_text(k + 1, thresholds, quantiles), s)
            for k, s in enumerate(stages)]


def hold_out(records: Sequence[Record], data_cfg: Any, seed: int) -> tuple[Stage, ...]:
    """Each stage's held-out records: round(eval_fraction * size) of them, by hash."""
    fraction = float(data_cfg.eval_fraction)
    if fraction <= 0:
        return ()
    out = []
    for name, label, recs in eval_stages(records, data_cfg):
        ranked = sorted((_hash(seed, r.id), r.id) for r in recs)
        n = int(round(fraction * len(recs)))
        out.append(Stage(name, label, len(recs), tuple(i for _, i in ranked[:n])))
    return tuple(out)


def draw_replay(train_ids: Sequence[Sequence[str]], replay: float, seed: int) -> tuple[Draw, ...]:
    """Per phase, the records it replays from the phases before it (see the module doc)."""
    draws = [Draw((), len(train_ids[0]) if train_ids else 0, 0, 0)]
    for k in range(1, len(train_ids)):
        pool = [i for ids in train_ids[:k] for i in ids]
        wanted = int(round(replay * len(train_ids[k]))) if replay > 0 else 0
        take = min(wanted, len(pool))
        rng = np.random.default_rng([seed, k, REPLAY_SALT])
        picked = np.sort(rng.choice(len(pool), size=take, replace=False)) if take else []
        draws.append(Draw(tuple(pool[i] for i in picked), len(train_ids[k]), wanted, len(pool)))
    return tuple(draws[:len(train_ids)])


def make_splits(records: Sequence[Record], phases: Sequence[Phase], data_cfg: Any,
                seed: int) -> Splits:
    """The held-out stages, each phase's own training records and its replay draw."""
    stages = hold_out(records, data_cfg, seed)
    held = frozenset(i for s in stages for i in s.heldout_ids)
    train_ids = tuple(tuple(r.id for r in ph.records if r.id not in held) for ph in phases)
    replay = float(data_cfg.get("replay", 0.0))
    return Splits(stages, train_ids, draw_replay(train_ids, replay, seed))


def replay_note(k: int, draw: Draw, replay: float) -> str:
    """Why phase k replays fewer records than asked, for the run's summary."""
    return (f"note: phase {k + 1} replays all {draw.available} training records of the phases "
            f"before it, fewer than round(data.replay={replay:g} x {draw.own}) = {draw.wanted}")
