"""Step metrics: loss, grad norm, LR, tokens/s and MFU to TensorBoard, JSON lines and the console
(and, with `train.wandb`, the same scalars to Weights & Biases: `tracking.py`).

MFU = model matmul FLOPs per step (`flops_per_token`, 6N-style, with attention) / step time /
(peak FLOPs per device x devices). Peaks are dense bf16 figures from the vendors' spec sheets;
on CPU (or an unknown device) the figure comes from `config.train.peak_flops` or a matmul probe.

Padding costs compute but teaches nothing, so beside the padded figures (`tokens_per_s`, `mfu`:
every position of the [batch, max_length] step) come the useful ones (`useful_tokens_per_s`,
`useful_mfu`): the same over non-padding tokens only (`segment_ids` != 0, counted on device by
the step as `useful_tokens`), i.e. the padded figures times the fraction of real tokens between
the two log points. `useful_mfu` counts each real token at the padded length's FLOPs per token.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from phased_jax.accelerators import DEVICES, device_name


def probe_matmul_flops(n: int = 1024, repeats: int = 5, dtype: Any = jnp.float32) -> float:
    """FLOP/s that one jitted `jnp.dot` of n x n matrices reaches here (median of `repeats`)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y))
    f(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / float(np.median(times))


def peak_flops_per_device(device: Any = None, configured: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure came from)."""
    if configured > 0:
        return float(configured), "config.train.peak_flops"
    device = device or jax.devices()[0]
    name = device_name(device.device_kind)
    if name is not None:
        return DEVICES[name][1], f"table ({device.device_kind})"
    # CPU: one probe uses every core of the host, whatever the number of (fake) devices.
    return probe_matmul_flops() / jax.local_device_count(), "matmul probe (f32)"


def scalar_tags(prefix: str, record: dict[str, Any]) -> dict[str, float]:
    """A record's scalars (a `metrics.jsonl` row or one being written) under the names
    TensorBoard and W&B give them, `<prefix>/<key>`."""
    return {f"{prefix}/{key}": value for key, value in record.items()
            if key not in ("phase", "step", "time")}


class TensorBoardScalars:
    """A TensorBoard event file of scalars, written in the caller's thread.

    tensorboardX's SummaryWriter writes from a thread of its own that dies on a write error (a
    full disk) without a word, after which its bounded queue blocks the training loop forever
    at the next few scalars. Written here, the error is raised where the runner reports it in
    one line (`phased_jax.io_errors`); metrics are written every `log_every` steps, so the
    synchronous write costs nothing that matters.
    """

    def __init__(self, directory: Path, suffix: str = "") -> None:
        from tensorboardX.event_file_writer import EventsWriter

        directory.mkdir(parents=True, exist_ok=True)
        self._file = EventsWriter(str(directory / "events"), suffix)

    def write(self, scalars: dict[str, float], step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        now = time.time()
        for tag, value in scalars.items():
            self._file.write_event(Event(wall_time=now, step=int(step), summary=scalar(tag, value)))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class MetricsWriter:
    """Writes one record every `log_every` steps; also the console progress bar.

    `write(step, metrics)` is called after every step with the step's on-device metrics; only
    at log steps does it wait for the device, so the step loop stays asynchronous. Throughput
    is measured over the steps between two log points.
    """

    def __init__(self, log_dir: str | Path, *, flops_per_step: float, tokens_per_step: int,
                 peak_flops_total: float, total_steps: int, log_every: int = 10,
                 tensorboard: bool = True, console: bool = True, prefix: str = "train",
                 step_offset: int = 0, tracker: Any = None) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.flops_per_step, self.tokens_per_step = flops_per_step, tokens_per_step
        self.peak_flops_total, self.log_every = peak_flops_total, max(1, log_every)
        self.prefix, self.step_offset = prefix, step_offset
        self._tracker = tracker  # a tracking.Tracker: W&B gets TensorBoard's scalars
        self._json = open(self.log_dir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        self._tb = None
        if tensorboard and jax.process_index() == 0:
            self._tb = TensorBoardScalars(self.log_dir / "tensorboard")
        self._bar = None
        if console and jax.process_index() == 0:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, desc=prefix, dynamic_ncols=True)
        self._last_time: float | None = None
        self._steps_since = 0
        self._useful: list[Any] = []  # each step's on-device `useful_tokens` since the last log

    def write(self, step: int, metrics: dict[str, Any], force: bool = False) -> dict[str, float] | None:
        """Record step `step` (1-based within this run); returns the record when one was written."""
        if "useful_tokens" in metrics:
            self._useful.append(metrics["useful_tokens"])  # no sync: summed at the log point
        if self._last_time is None:  # the first step includes compilation: time from its end
            jax.block_until_ready(metrics)
            self._last_time = time.perf_counter()
            self._steps_since = 0
            record = self._record(step, metrics, None)
            self._useful = []
        else:
            self._steps_since += 1
            if not force and step % self.log_every:
                self._advance()
                return None
            jax.block_until_ready(metrics)
            now = time.perf_counter()
            record = self._record(step, metrics, (now - self._last_time) / self._steps_since)
            self._last_time, self._steps_since, self._useful = now, 0, []
        self._emit(record)
        self._advance()
        return record

    def _record(self, step: int, metrics: dict[str, Any], step_time: float | None) -> dict[str, float]:
        record = {"step": step + self.step_offset, "time": time.time()}
        record.update({k: float(v) for k, v in jax.device_get(metrics).items()})
        if step_time:
            record["step_time_s"] = step_time
            record["tokens_per_s"] = self.tokens_per_step / step_time
            if self.peak_flops_total > 0:
                record["mfu"] = self.flops_per_step / step_time / self.peak_flops_total
            if self._useful and self.tokens_per_step > 0:
                fraction = (float(np.sum(jax.device_get(self._useful)))
                            / (len(self._useful) * self.tokens_per_step))
                record["useful_fraction"] = fraction
                record["useful_tokens_per_s"] = record["tokens_per_s"] * fraction
                if "mfu" in record:
                    record["useful_mfu"] = record["mfu"] * fraction
        return record

    def _emit(self, record: dict[str, float]) -> None:
        if jax.process_index() != 0:
            return
        self._json.write(json.dumps({"phase": self.prefix, **record}) + "\n")
        self._json.flush()
        scalars = scalar_tags(self.prefix, record)
        if self._tb is not None:
            self._tb.write(scalars, record["step"])
        if self._tracker is not None:
            self._tracker.log(scalars, record["step"])
        if self._bar is not None:
            shown = {k: record[k] for k in ("loss", "grad_norm", "lr", "tokens_per_s", "mfu",
                                               "useful_mfu")
                     if k in record}
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)

    def _advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        self._json.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()


class EvalWriter:
    """Eval losses at a global step: a `metrics.jsonl` row whose `phase` is `eval`, and the
    scalars `eval/<name>` in TensorBoard and W&B (which replays them from that row on resume,
    like every other metrics row). Process 0 writes; the others do nothing."""

    def __init__(self, log_dir: str | Path, tensorboard: bool = True, tracker: Any = None) -> None:
        self.log_dir, self._tracker = Path(log_dir), tracker
        self._enabled = jax.process_index() == 0
        self._tensorboard = tensorboard and self._enabled
        self._tb: TensorBoardScalars | None = None

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self._enabled:
            return
        record = {"step": int(step), "time": time.time(), **values}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"phase": "eval", **record}) + "\n")
        scalars = scalar_tags("eval", record)
        if self._tensorboard:
            if self._tb is None:  # its own file: a phase's writer may open one in the same second
                self._tb = TensorBoardScalars(self.log_dir / "tensorboard", suffix=".eval")
            self._tb.write(scalars, step)
        if self._tracker is not None:
            self._tracker.log(scalars, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def make_writer(trainer: Any, seq_len: int, log_dir: str | Path, total_steps: int,
                prefix: str = "train", step_offset: int = 0, console: bool = True,
                tracker: Any = None) -> MetricsWriter:
    """A MetricsWriter sized from a Trainer (its model, batch and `train` section) and the
    sequence length of its batches."""
    tc = trainer.train_cfg
    peak, _ = peak_flops_per_device(configured=float(tc.peak_flops))
    return MetricsWriter(
        log_dir, flops_per_step=trainer.flops_per_step(seq_len),
        tokens_per_step=trainer.global_batch * seq_len, peak_flops_total=peak * jax.device_count(),
        total_steps=total_steps, log_every=int(tc.log_every),
        tensorboard=bool(tc.get("tensorboard", True)), console=console, prefix=prefix,
        step_offset=step_offset, tracker=tracker)
