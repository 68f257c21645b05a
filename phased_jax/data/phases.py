"""Stratify records into difficulty stages and arrange the stages into training phases.

Stages come from the score: by thresholds (stage k holds [t_{k-1}, t_k); the paper's
(1.5, 3.5) gives [1, 1.5), [1.5, 3.5), [3.5, 5], the top stage including 5) or, with
`quantiles=K`, K stages of (near-)equal size in score order, ties broken by read order.

`data.order` turns stages into phases, run in the order written:
- `"1,2,3"`: phased (the paper); any permutation `"2,1,3"`; prefixes `"1"`, `"1,2"`; one stage `"3"`.
- `"1+3"`: one phase of stages 1 and 3 mixed; combinations like `"1+2,3"`.
- `"oneoff"`: one phase of every record (the paper's baseline).
- `"random"`: stages of the same sizes as the score stages but filled with a seeded random
  permutation of all records, run 1, 2, ..., K (the paper's random-stages ablation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from phased_jax.data.records import Record
from phased_jax.errors import ConfigError, DataError


@dataclass(frozen=True)
class Phase:
    """One training phase: `name` as in the order string ("1", "1+3", "oneoff")."""

    name: str
    stages: tuple[int, ...]  # 1-based stage numbers mixed into this phase
    records: tuple[Record, ...]

    @property
    def size(self) -> int:
        return len(self.records)

    @property
    def label(self) -> str:
        """For messages: "stage 2", "stages 1+3", "oneoff", "random-1"."""
        if not self.name[0].isdigit():
            return self.name
        return ("stages " if "+" in self.name else "stage ") + self.name

    @property
    def mean_score(self) -> float:
        scores = [r.score for r in self.records if r.score is not None]
        return float(np.mean(scores)) if scores else float("nan")


def _scores(records: Sequence[Record]) -> np.ndarray:
    missing = [r.source for r in records if r.score is None]
    if missing:
        raise DataError(f"{len(missing)} records have no score (first: {missing[0]}); score them "
                        "with phased-score, or train one-off with --config.data.order=oneoff")
    return np.array([r.score for r in records], dtype=np.float64)


def stage_bounds(thresholds: Sequence[float]) -> list[tuple[float, float]]:
    """[(low, high)] per stage for display; the top stage's high is inclusive."""
    edges = [1.0, *thresholds, 5.0]
    return list(zip(edges[:-1], edges[1:], strict=True))


def stratify(records: Sequence[Record], thresholds: Sequence[float] = (1.5, 3.5),
             quantiles: int = 0) -> list[list[Record]]:
    """Stages of `records` (read order kept inside each stage); see the module docstring."""
    scores = _scores(records)
    if quantiles:
        if quantiles < 1:
            raise ConfigError(f"data.quantiles must be >= 0, not {quantiles}")
        order = np.argsort(scores, kind="stable")
        return [[records[i] for i in sorted(chunk)] for chunk in np.array_split(order, quantiles)]
    t = np.asarray(thresholds, dtype=np.float64)
    if t.ndim != 1 or np.any(np.diff(t) <= 0):
        raise ConfigError(f"data.thresholds must increase strictly, got {tuple(thresholds)}")
    stage_of = np.searchsorted(t, scores, side="right")  # score == t_k goes to the upper stage
    return [[r for r, s in zip(records, stage_of, strict=True) if s == k]
            for k in range(len(t) + 1)]


NAMED_ORDERS = ("oneoff", "random")  # built by `build_phases` itself, not stage lists


def check_order(order: str, num_stages: int) -> None:
    """Raise a ConfigError naming `data.order` unless `build_phases` can build it."""
    if order.strip() not in NAMED_ORDERS:
        parse_order(order, num_stages)


def single_phase(order: str) -> bool:
    """True where `order` makes one phase ("oneoff", "3", "1+2+3"): nothing to replay."""
    order = order.strip()
    return order == "oneoff" or (order not in NAMED_ORDERS and "," not in order)


def parse_order(order: str, num_stages: int) -> list[tuple[int, ...]]:
    """A stage list: `"1+2,3"` -> [(1, 2), (3,)] (the phases' stages, in training order)."""
    order = order.strip().replace(" ", "")
    phases, used = [], set()
    for part in order.split(","):
        try:
            stages = tuple(int(s) for s in part.split("+"))
        except ValueError:
            raise ConfigError(f"data.order {order!r}: {part!r} is not a stage like '2' or '1+3'; "
                              "write e.g. '1,2,3', '2,1,3', '1+3', 'oneoff' or 'random'") from None
        for s in stages:
            if not 1 <= s <= num_stages:
                raise ConfigError(f"data.order {order!r}: stage {s} outside 1..{num_stages} "
                                  f"(data.thresholds or data.quantiles make {num_stages} stages)")
            if s in used:
                raise ConfigError(f"data.order {order!r}: stage {s} appears twice")
            used.add(s)
        phases.append(stages)
    return phases


def build_phases(records: Sequence[Record], order: str = "1,2,3",
                 thresholds: Sequence[float] = (1.5, 3.5), quantiles: int = 0,
                 seed: int = 0) -> list[Phase]:
    """The phases of `order`, in training order. Empty phases are kept (the caller reports them)."""
    if order.strip() == NAMED_ORDERS[0]:  # needs no scores, so plain Alpaca can be trained one-off
        return [Phase("oneoff", (), tuple(records))]
    stages = stratify(records, thresholds, quantiles)
    if order.strip() == NAMED_ORDERS[1]:
        perm = np.random.default_rng([seed, 0x5EED]).permutation(len(records))
        shuffled = [records[i] for i in perm]
        ends = np.cumsum([len(s) for s in stages])
        stages = [shuffled[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
        return [Phase(f"random-{k + 1}", (k + 1,), tuple(s)) for k, s in enumerate(stages)]
    return [Phase("+".join(map(str, p)), p, tuple(r for s in p for r in stages[s - 1]))
            for p in parse_order(order, len(stages))]


def config_phases(records: Sequence[Record], data_cfg, seed: int) -> list[Phase]:
    """`build_phases` with the fields of a config's `data` section and the run's seed."""
    return build_phases(records, data_cfg.order, tuple(data_cfg.thresholds),
                        int(data_cfg.quantiles), seed)


def stage_text(stage: int, thresholds: Sequence[float], quantiles: int) -> str:
    if quantiles:
        return f"quantile stage {stage} of {quantiles}"
    bounds = stage_bounds(thresholds)
    lo, hi = bounds[stage - 1]
    return f"[{lo:g}, {hi:g}]" if stage == len(bounds) else f"[{lo:g}, {hi:g})"


def check_phases(phases: Sequence[Phase], records: Sequence[Record], data_cfg: Any) -> None:
    """Raise a DataError if a phase has no records, naming it, its scores and the fix.

    Why: an empty phase would otherwise fail only when it starts (a run of 0 steps), after the
    phases before it have trained for hours. Called by `prepare` and `phased-jax stats` as soon
    as the data is stratified, before tokenising.
    """
    empty = [(i, ph) for i, ph in enumerate(phases) if ph.size == 0]
    if not empty:
        return
    thresholds, quantiles = tuple(data_cfg.thresholds), int(data_cfg.quantiles)
    order = data_cfg.order.strip().replace(" ", "")

    def describe(i: int, ph: Phase) -> str:
        stages = "+".join(map(str, ph.stages))
        scores = " + ".join(stage_text(s, thresholds, quantiles) for s in ph.stages)
        kind = "random stage" if order == "random" else "stage" + ("s" if len(ph.stages) > 1 else "")
        what = scores if quantiles else f"scores {scores}"
        if order == "random":
            what = f"the size of score stage {stages}, {what}"
        return f"phase {i + 1} ({kind} {stages}, {what})"

    paths = ", ".join(map(str, data_cfg.paths))
    message = f"{describe(*empty[0])} has no records in {paths}"
    if len(empty) > 1:
        message += ", nor " + ("have " if len(empty) > 2 else "has ") + ", ".join(
            describe(i, ph) for i, ph in empty[1:])
    scores = [r.score for r in records if r.score is not None]
    span = f"; this data's scores span [{min(scores):g}, {max(scores):g}]" if scores else ""
    if quantiles:
        fix = f"use data.quantiles <= {len(records)} (one record per stage at least)"
    else:
        sizes = [len(s) for s in stratify(records, thresholds)] if order != "random" else []
        kept = [p for p in ("+".join(str(s) for s in ph.stages if sizes[s - 1]) for ph in phases)
                if p] if sizes else []
        fix = (f'use data.order="{",".join(kept)}" or other data.thresholds' if kept
               else "use other data.thresholds")
    raise DataError(f"{message}{span}: {fix}")
