"""Experiment tracking in Weights & Biases (`train.wandb`), beside TensorBoard; optional.

`train.wandb.project = ""` (the default) keeps W&B off and never imports it, so the demo and
the tests need no account, network or package (`pip install 'phased-jax[wandb]'` adds it).
With a project, process 0 opens one W&B run (the other processes log nothing, as for
TensorBoard) with the whole config as its config, its files under `<output_dir>/logs/wandb/`
(`train.wandb.mode=offline` or `WANDB_MODE=offline` needs no network; `wandb sync` uploads later).
It logs every scalar MetricsWriter gives TensorBoard, under the same names
(`phase1-stage1/loss`, ...), plus `phase` at each phase start, `phase_end` at each phase end
and `eval/loss` where a phase end computes one; the phases' first and last global steps and
eval losses also go to the run's summary.

Resume: the run id is kept in `<output_dir>/logs/wandb_run_id` (written whole before the run
starts) and a rerun of the same command passes it back with `resume="allow"`, so a run killed
and resumed stays one W&B run (offline: one `offline-run-*-<id>` folder per attempt, all synced
into that run). Delete the file to start a new W&B run in the same output directory.

Steps: W&B's own step must only increase; a row logged with `step=` below it is dropped. A
resumed run re-runs the steps since its last checkpoint (bitwise the same), so rows never set
W&B's step: each carries `global_step` (the step over all phases, TensorBoard's x-axis) and
every metric is plotted against it (`define_metric(step_metric="global_step")`). A re-run step
is then a second row at the same `global_step` with the same values: nothing is dropped or
misplaced, and W&B's internal `_step` only counts rows.

A kill loses the rows W&B had not yet written (it flushes its file every `FLUSH_S` seconds here,
15 s by default), rows before the last checkpoint included, which no step rerun brings back. So
a resumed attempt first logs again, from the run's own logs (`metrics.jsonl` and
`phase_log.jsonl`, rewound to the checkpoint), everything up to where it resumes (`replay`):
each attempt's W&B record holds the whole history to its end, and a row W&B had kept is
logged twice, with the same values at the same `global_step`.
"""

from __future__ import annotations

import importlib.util
import secrets
import string
from pathlib import Path
from types import TracebackType
from typing import Any

import jax
from ml_collections import ConfigDict

from phased_jax import preemption
from phased_jax.errors import ConfigError, PhasedError
from phased_jax.fileio import write_text_atomic
from phased_jax.train.metrics import scalar_tags

STEP = "global_step"
ID_FILE = "wandb_run_id"  # under <output_dir>/logs/
MODES = ("", "online", "offline", "disabled")
INSTALL = "pip install 'phased-jax[wandb]'"
FLUSH_S = 1.0  # W&B's .wandb file is flushed this often: what a kill can lose (offline)


def installed() -> bool:
    """Whether `import wandb` would find it (without importing it)."""
    return importlib.util.find_spec("wandb") is not None


def enabled(config: ConfigDict) -> bool:
    """Whether `config` asks for W&B (`train.wandb.project` set)."""
    section = config.train.get("wandb")
    return section is not None and bool(section.get("project", ""))


class Tracker:
    """One experiment's W&B run, or nothing (off, or not process 0): every method is then a
    no-op. Used as a context manager around the run: it finishes the W&B run on exit, marked
    failed (exit code 1) when an exception ends it."""

    def __init__(self, run: Any = None) -> None:
        self.run = run

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else self.run.id

    def log(self, scalars: dict[str, float], global_step: int) -> None:
        """One row of scalars at `global_step` (never W&B's own step: see the module doc)."""
        if self.run is not None:
            self.run.log({**scalars, STEP: int(global_step)})

    def phase_start(self, phase: int, label: str, first_step: int, from_step: int) -> None:
        """Phase `phase` (1-based), whose first global step is `first_step`, runs (or, resumed,
        reruns) from global step `from_step` on."""
        if self.run is not None:
            self.log({"phase": phase}, from_step)
            self.run.summary[f"phases/{label}/first_step"] = first_step

    def phase_end(self, phase: int, label: str, last_step: int) -> None:
        if self.run is not None:
            self.log({"phase_end": phase}, last_step)
            self.run.summary[f"phases/{label}/last_step"] = last_step

    def eval_summary(self, label: str, losses: dict[str, float]) -> None:
        """A phase end's eval losses in the run's summary (the scalars themselves come as
        metrics rows: `metrics.EvalWriter`)."""
        if self.run is not None:
            for name, value in losses.items():
                self.run.summary[f"phases/{label}/eval/{name}"] = value

    def replay(self, metrics: list[dict[str, Any]]) -> None:
        """Log again `metrics.jsonl` rows (MetricsWriter's records) under the names
        MetricsWriter gave them."""
        if self.run is None:
            return
        for row in metrics:
            self.log(scalar_tags(row["phase"], row), row["step"])

    def close(self, exit_code: int = 0) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=exit_code)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is not None and issubclass(kind, preemption.Preempted) and self.run is not None:
            self.run.mark_preempting()  # W&B shows it preempted, awaiting the resumed run
        self.close(0 if kind is None else preemption.PREEMPTED_EXIT
                   if issubclass(kind, preemption.Preempted) else 1)


def run_id(log_dir: Path) -> str:
    """The W&B run id saved in `log_dir`, or a new one (8 characters as W&B's own) saved there
    whole or not at all, before the run starts, so a kill at any moment leaves it."""
    path = log_dir / ID_FILE
    if path.is_file():
        saved = path.read_text().strip()
        if saved:
            return saved
    new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    write_text_atomic(path, new + "\n")
    return new


def _settings(wandb: Any) -> Any:
    """W&B writes its `.wandb` file every 15 s by default, so a kill would lose up to 15 s of
    rows (offline, the file is all there is); every FLUSH_S instead, where wandb has the knob."""
    if "x_transaction_log_flush_interval" in wandb.Settings.model_fields:
        return wandb.Settings(x_transaction_log_flush_interval=FLUSH_S)
    return None


def start(config: ConfigDict, output_dir: str | Path) -> Tracker:
    """The run's Tracker: a W&B run on process 0 when `train.wandb.project` is set (resuming
    the one whose id `<output_dir>/logs` holds), else one that does nothing."""
    if not enabled(config) or jax.process_index() != 0:
        return Tracker()
    if not installed():
        raise ConfigError(f"train.wandb.project is set but wandb is not installed: {INSTALL}")
    import wandb

    wc = config.train.wandb
    log_dir = Path(output_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        run = wandb.init(project=wc.project, entity=wc.get("entity") or None,
                         name=wc.get("name") or config.get("name") or None,
                         tags=list(wc.get("tags", ())) or None, mode=wc.get("mode") or None,
                         dir=str(log_dir), id=run_id(log_dir), resume="allow",
                         config=config.to_dict(), settings=_settings(wandb))
    except wandb.errors.Error as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PhasedError(f"train.wandb: W&B could not start the run: {why}; log in "
                          "(`wandb login`) or set train.wandb.mode=offline") from None
    run.define_metric(STEP)
    run.define_metric("*", step_metric=STEP)
    return Tracker(run)
