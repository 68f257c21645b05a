"""The train state: what a checkpoint holds and a step consumes and returns."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
    """Steps taken in this run, parameters, and the optimizer's state.

    The LR schedule's position and the run's length live in `opt_state` (see
    `optimizer.make_optimizer`), so a state is all data: the optimizer itself belongs to the
    `Trainer`, and one compiled step serves every phase.
    """

    step: jax.Array
    params: Any
    opt_state: Any
