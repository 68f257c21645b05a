"""A preemption notice stops a run at a step every process agrees on, with a checkpoint there.

Cloud TPU sends SIGTERM to every host of a slice it reclaims (a spot slice, a maintenance
event), then kills them after a short grace period. Without a handler each process dies where
it stands and the rerun repeats up to `checkpoint.every_steps` steps.

On several processes JAX's preemption service (armed by `jax.distributed.initialize`) hears the
SIGTERM of any host and agrees one point past every process's position then
(`multihost_utils.reached_preemption_sync_point`): each process asks `Notice.reached(step)`
after every step, and at the agreed step it answers True on all of them. The steps are the
run's global steps, as Orbax's `CheckpointManager.save` passes them to the same sync point. On
one process a Python signal handler notes the notice and the very next question answers True:
no step is lost.
What a run does there (save, log, exit `PREEMPTED_EXIT`) is the runner's.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

import jax
from jax.experimental import multihost_utils

# EX_TEMPFAIL (sysexits.h): "try again later". The local pod launcher and launch/tpu.sh know it.
PREEMPTED_EXIT = 75
_early: list[bool] = []  # a notice heard before JAX's service was armed (`arm_early`)


class Preempted(Exception):  # noqa: N818 - not an error: the run stopped where it was told to
    """The run stopped at the agreed point, its checkpoint saved; the message says where."""


class Notice:
    """Whether a preemption notice has reached this point of the run, on every process alike.

    Every process asks after the same global steps, in order (asking again about the same step,
    as at a phase end, is harmless): JAX's service agrees the step after the highest one any
    process had asked about when the notice came.
    """

    def __init__(self) -> None:
        self._heard = False
        self._previous: signal.Handlers | None = None
        self._multi = jax.process_count() > 1
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._hear)
            self._heard = bool(_early)

    def _hear(self, signum: int, frame: FrameType | None) -> None:
        self._heard = True

    def reached(self, step: int) -> bool:
        """True at the global `step` where the run must stop for a notice (the same on all
        processes)."""
        if self._multi:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self._heard

    def close(self) -> None:
        """Give SIGTERM back to whoever had it (one process: Python's default, which kills)."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def arm_early() -> None:
    """Before `jax.distributed.initialize` (which installs JAX's own SIGTERM listener): note a
    notice that comes during start-up, so it is not a kill; `pass_on_early` hands it to JAX."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: _early.append(True))


def pass_on_early() -> None:
    """After JAX's listener is installed: send a notice heard during start-up again, to it."""
    if _early and jax.process_count() > 1:
        os.kill(os.getpid(), signal.SIGTERM)
