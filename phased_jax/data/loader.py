"""Deterministic per-host batches of one phase, indexed by step.

Why index-by-step and not an iterator library (grain, tf.data): a batch is a pure function of
(seed, phase index, step), so
- resume is exact: the checkpoint stores only (phase index, step); there is no iterator state
  to serialise, version or keep in sync with the train state;
- each host computes its own slice of the global batch independently, with no coordination;
- it needs no extra dependency. Tokenised Alpaca-sized data (tens of MB) fits in host memory,
  and building a batch is microseconds next to a training step (benchmarks/pipeline.py), so
  grain's worker processes would buy nothing here.

Epoch e of phase k visits the phase's examples in the order of a permutation seeded by
(seed, k, e) (`shuffle=False`: read order). With packing, consecutive examples in that order
fill a row until the next one does not fit. An epoch has ceil(rows / global_batch) steps: the
last batch is completed with empty rows (loss_mask 0 everywhere), so shapes stay fixed and no
example is dropped, matching the paper's HF Trainer, which keeps the partial batch.
Host p of P takes rows p*B:(p+1)*B of each global batch, B = global_batch // P.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from phased_jax.data.tokens import TokenizedExamples, build_rows, pack
from phased_jax.errors import ConfigError, DataError


class PhaseLoader:
    """Batches of one phase: `batch(step)` for step in range(`steps`)."""

    def __init__(self, examples: TokenizedExamples, global_batch: int, epochs: int, seed: int,
                 phase_index: int, process_index: int = 0, process_count: int = 1,
                 packing: bool = False, shuffle: bool = True, max_steps: int = -1):
        if global_batch <= 0 or global_batch % process_count:
            raise ConfigError(f"global batch {global_batch} must be a positive multiple of the "
                              f"{process_count} processes")
        if not 0 <= process_index < process_count:
            raise ConfigError(f"process_index {process_index} outside 0..{process_count - 1}")
        self.examples = examples
        self.global_batch, self.epochs, self.seed = global_batch, epochs, seed
        self.phase_index, self.packing, self.shuffle = phase_index, packing, shuffle
        self.process_index, self.process_count = process_index, process_count
        self.local_batch = global_batch // process_count
        # Per epoch: example order and row boundaries into it (both small int arrays).
        self._orders = [self.epoch_order(e) for e in range(epochs)]
        lengths = examples.lengths
        self._row_offsets = [pack(lengths[o], examples.max_length) if packing
                             else np.arange(len(o) + 1, dtype=np.int64) for o in self._orders]
        epoch_steps = [-(-(len(r) - 1) // global_batch) for r in self._row_offsets]
        self._epoch_start = np.concatenate([[0], np.cumsum(epoch_steps)]).astype(np.int64)
        total = int(self._epoch_start[-1])
        self.steps = min(total, max_steps) if max_steps > 0 else total

    def epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.examples)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng([self.seed, self.phase_index, epoch]).permutation(n)

    def rows_per_epoch(self, epoch: int) -> int:
        return len(self._row_offsets[epoch]) - 1

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of a step of the phase."""
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} outside 0..{self.steps - 1} of phase {self.phase_index}")
        epoch = int(np.searchsorted(self._epoch_start, step, side="right") - 1)
        return epoch, step - int(self._epoch_start[epoch])

    def rows(self, step: int) -> list[np.ndarray | None]:
        """This host's rows at `step`, each the example indices packed into it (None = empty)."""
        epoch, s = self.locate(step)
        order, offsets = self._orders[epoch], self._row_offsets[epoch]
        first = s * self.global_batch + self.process_index * self.local_batch
        return [order[offsets[r]:offsets[r + 1]] if r < len(offsets) - 1 else None
                for r in range(first, first + self.local_batch)]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This host's int32 arrays [global_batch // process_count, max_length] at `step`."""
        return build_rows(self.examples, self.rows(step))

    def state_dict(self, step: int) -> dict[str, int]:
        """The data position to checkpoint: the next step to run, plus what must match on resume."""
        return {"phase_index": self.phase_index, "step": int(step), "steps": self.steps,
                "num_examples": len(self.examples), "seed": self.seed}

    def start_step(self, state: dict[str, Any]) -> int:
        """The step to resume from, after checking the state belongs to this phase's data."""
        mine = self.state_dict(0)
        for key in ("phase_index", "num_examples", "seed"):
            if int(state[key]) != mine[key]:
                raise DataError(f"checkpointed data position has {key}={state[key]} but this "
                                f"phase has {mine[key]}: the data or config changed since the "
                                "checkpoint; restore with the same data and config")
        step = int(state["step"])
        if not 0 <= step <= self.steps:
            raise DataError(f"checkpointed step {step} outside 0..{self.steps}")
        return step
