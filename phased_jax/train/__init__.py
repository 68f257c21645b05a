"""Training: the loss, AdamW, the train state and step, the Trainer, metrics, the planner and
the phase runner.

The phase runner (`phased_jax.train.runner`) uses `build_trainer(config)`, then per phase
`Trainer.init_state(num_steps, params=...)`, `Trainer.shard_batch`, `Trainer.step` and a
`metrics.MetricsWriter`.
"""

from phased_jax.train.state import TrainState
from phased_jax.train.trainer import Trainer, build_trainer

__all__ = ["Trainer", "TrainState", "build_trainer"]
