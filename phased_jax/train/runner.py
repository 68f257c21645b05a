"""`phased-jax train --config configs/X.py`: the phases of one experiment, in order, resumable.

For each phase in the config's order: restore-or-init, a fresh optimizer and LR schedule sized
to the phase (the paper's way; `train.schedule_scope=run` keeps one across phases), the phase's
epochs of steps, a checkpoint every `checkpoint.every_steps` and at the phase's end, eval loss
on held-out data if any. Running the same command again resumes from the newest checkpoint that
restores: the data loader is indexed by step, so the checkpoint's (phase, step) is the whole
data position and the resumed run is bitwise the uninterrupted one. A kill at any moment costs
nothing: restore never destroys (`phased_jax.checkpoint`), a run resumed at a phase end first
does what that phase still owes, and every file appears whole or not at all.

Files under `output_dir`: `checkpoints/<global step>/` (Orbax; phase ends kept for good),
`phases/phase<k>-<name>/` (phase-end params, `phased-jax convert` exports them to HF),
`logs/metrics.jsonl` + `logs/tensorboard/` (+ `logs/wandb/` with `train.wandb`: `tracking.py`),
`logs/phase_log.jsonl` (one line per step run),
`hf/` (the final model in HF format), `data_report.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import flags
from ml_collections import ConfigDict

from phased_jax import distributed, hf, io_errors, local_paths, preemption
from phased_jax.checkpoint import RunCheckpoints
from phased_jax.config import model_config
from phased_jax.config_checks import validate_config
from phased_jax.config_cli import parse_config_argv
from phased_jax.data.pipeline import Batching, prepare
from phased_jax.data.splits import metric_name
from phased_jax.errors import CheckpointError, ConfigError, UsageError
from phased_jax.hf.peft import AdapterError, adapter_complete, load_adapter, save_adapter
from phased_jax.hf.to_hf import tokenizer_files
from phased_jax.init_from import checkpoint_kind, resolve_model
from phased_jax.model import Transformer
from phased_jax.model.config import ModelConfig
from phased_jax.model.lora import merge as lora_merge
from phased_jax.params_checkpoint import (
    load_params,
    params_complete,
    params_nbytes,
    save_params,
)
from phased_jax.train import forgetting, tracking
from phased_jax.train.metrics import EvalWriter, make_writer
from phased_jax.train.runlog import RunLog, read_events
from phased_jax.train.trainer import Trainer, build_trainer

# A callback after each step (and the start of its checkpoint save, if any): (runner, phase
# index, steps done in the phase). The tests install theirs (tests/runner/hooked_train.py).
StepHook = Callable[["PhaseRunner", int, int], None]
TRAIN_COMMAND = (sys.executable, "-m", "phased_jax.cli", "train")  # a local pod's workers
LAUNCHER_FLAGS = ("--local_pod", "--local_devices", "--watchdog_s")  # not the workers' (underscored)

USAGE = """usage: phased-jax train --config CONFIG_FILE [--config.SECTION.FIELD=VALUE ...]
                       [--local-pod N [--local-devices D] [--watchdog-s S]] [--distributed]

Runs the config's phases in order; rerun the same command to resume from the latest checkpoint.
A SIGTERM (preemption) saves a checkpoint at a step all processes agree on and exits 75.
  --local-pod N      run as N local CPU processes joined by jax.distributed (tests a pod)
  --local-devices D  fake CPU devices per local process (default 4)
  --watchdog-s S     stop a local pod in which no worker made progress for S seconds, its
                     workers' Python stacks in <output_dir>/logs/local_pod_stacks.txt
                     (default 300; 0: never)
  --distributed      call jax.distributed.initialize() (multi-host pods; launch/tpu.sh sets it)"""


def _define_flags(fv) -> None:
    flags.DEFINE_integer("local_pod", 0, "run as N local processes", flag_values=fv)
    flags.DEFINE_integer("local_devices", 4, "fake CPU devices per local process", flag_values=fv)
    flags.DEFINE_float("watchdog_s", 300.0, "stop a local pod idle this long (0: never)",
                       flag_values=fv)
    flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() on a pod", flag_values=fv)


def main(argv: list[str], hooks: Sequence[StepHook] = (),
         worker_command: Sequence[str] = TRAIN_COMMAND) -> int:
    """The `train` subcommand; `hooks` and the local pod's `worker_command` are for callers
    that extend a run (the tests' fault injection runs each worker with its own hooks)."""
    argv = [a.replace("--local-pod", "--local_pod").replace("--local-devices", "--local_devices")
            .replace("--watchdog-s", "--watchdog_s")
            if a.startswith(("--local-", "--watchdog-")) else a for a in argv]
    fv = parse_config_argv(argv, "phased-jax train", USAGE, _define_flags)
    if fv is None:
        return 0
    local_paths.check_train(fv.config)  # inputs, outputs and the Hub: before any data is read
    if fv.local_pod > 0:
        command = [*worker_command, *distributed.without_flags(argv, LAUNCHER_FLAGS)]
        stacks = Path(fv.config.output_dir) / "logs" / "local_pod_stacks.txt"
        return distributed.launch_local_pod(fv.local_pod, command, fv.local_devices,
                                            watchdog_s=fv.watchdog_s, stacks_path=stacks)
    distributed.initialize(auto=fv.distributed)
    try:
        with io_errors.quiet_disk_full_noise():  # Orbax's threads echo a full disk at any moment
            run(fv.config, (_heartbeat, *hooks))
    except preemption.Preempted as e:
        _say(str(e))
        return preemption.PREEMPTED_EXIT
    return 0


def _heartbeat(run: PhaseRunner, k: int, steps_done: int) -> None:
    """A step hook: a local pod worker's heartbeat for its launcher's watchdog (else a no-op);
    first of the hooks, so a hook that blocks still leaves the step it finished on record."""
    distributed.heartbeat(run.starts[k] + steps_done)


@dataclasses.dataclass
class Position:
    """Where a run is: the phase (in training order) and the next step to run in it."""

    phase: int = 0
    step: int = 0
    state: Any = None  # the restored train state, when resuming mid-phase or at a phase end


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def _initial_params(path: str, want: ModelConfig, shardings: Any, quantize_to: str = "",
                    float_shardings: Any = None) -> Any:
    """Params from `model.init_from` (HF directory or phased-jax params checkpoint), or None.
    Their shapes were checked against the config by `init_from.resolve_model`. `quantize_to`:
    a QLoRA base, quantised as an HF directory is read (`shardings` are the quantised tree's);
    a params checkpoint is read whole (`float_shardings`), `Trainer.set_base` quantises it."""
    if not path:
        return None
    if checkpoint_kind(path) == "hf":
        return hf.load(path, dtype=want.param_dtype, shardings=shardings,
                       quantize_to=quantize_to)[1]
    return load_params(path, float_shardings if quantize_to else shardings)[1]


def run(config: ConfigDict, hooks: Sequence[StepHook] = ()) -> dict[str, Any]:
    """Train every phase of `config` (resuming if checkpoints exist); returns a summary.

    Raises `preemption.Preempted` after a preemption notice, its checkpoint saved."""
    resolve_model(config)  # again: the demo and tests call run() without the command line
    validate_config(config)
    t_start = time.time()
    notice = preemption.Notice()  # first: a notice during the set-up is heard, not a kill
    try:
        runner = PhaseRunner(config, hooks, notice)
        with runner.tracker:  # the W&B run (if any) ends with this one, failed on an error
            pos = runner.resume()
            for k in range(pos.phase, len(runner.steps)):
                state = runner.train_phase(k, pos)
                runner.finish_phase(k, state)
                pos = Position(k + 1, 0, state)
                if k + 1 < len(runner.steps) and notice.reached(runner.starts[k + 1]):
                    runner.stop_preempted(k, runner.steps[k], state, saved=True)
            runner.close()
            if pos.state is None:
                raise ConfigError("no phase to run: the config's data produced no phases")
            runner.finish_run(pos.state)
    finally:
        notice.close()
    out, total = runner.out, runner.starts[-1]
    summary = {"phases": [p.phase.name for p in runner.data.phases], "steps": runner.steps,
               "phase_end_steps": runner.starts[1:], "output_dir": str(out),
               "hf_dir": runner.hf_dir, "seconds": time.time() - t_start}
    _say(f"done: {total} steps in {summary['seconds']:.0f}s; outputs in {out}")
    return summary


class PhaseRunner:
    """One experiment's phases over one Trainer, checkpoint manager and event log.

    Each phase owes, at its end, a checkpoint, its eval loss, its `phases/` params and a
    `phase_end` line; the run owes the HF export and a `done` line. What a killed run already
    did is read from the log (process 0's copy, shared), so a rerun does exactly the rest.
    """

    def __init__(self, config: ConfigDict, hooks: Sequence[StepHook] = (),
                 notice: preemption.Notice | None = None):
        self.config, self.out, self.hooks = config, Path(config.output_dir), tuple(hooks)
        self.notice = notice
        self.trainer = build_trainer(config)
        self.batching = Batching.from_sections(config.train, config.data, config.seed)
        self.data = prepare(config.data, self.batching, self.out,
                            write_report=jax.process_index() == 0)
        _say(self.data.summary())
        self.loaders = [p.loader(self.batching, jax.process_index(), jax.process_count())
                        for p in self.data.phases]
        self.steps = [ld.steps for ld in self.loaders]
        self.starts = np.concatenate([[0], np.cumsum(self.steps)]).astype(int).tolist()
        self.carry = config.train.schedule_scope == "run"
        # LoRA adapters merged into the base at each phase end, fresh ones for the next phase
        self.merge_each = self.trainer.lora is not None and bool(
            config.model.lora.get("merge_each_phase", False))
        cc = config.checkpoint
        self.ckpt_dir = cc.dir or str(self.out / "checkpoints")
        local = "://" not in self.ckpt_dir  # gs://... goes to Orbax (epath) as it is
        self.ckpts = RunCheckpoints(str(Path(self.ckpt_dir).absolute()) if local
                                    else self.ckpt_dir, keep=int(cc.keep),
                                    phase_end_steps=self.starts[1:],
                                    async_save=bool(cc.async_save),
                                    restore_retries=int(cc.restore_retries),
                                    retry_backoff_s=float(cc.retry_backoff_s),
                                    on_unreadable=str(cc.get("on_unreadable", "stop")))
        self.abstract_state = self.trainer.abstract_state()  # the restore target
        self.state_bytes = params_nbytes(self.abstract_state)  # what a checkpoint needs
        self.hf_dir = config.export.hf_dir or str(self.out / "hf")
        self.log = RunLog(self.out / "logs" / "phase_log.jsonl")
        self.logged: set[tuple[Any, Any]] = set()  # (event, phase) lines a killed run wrote
        self.initial_params: Any = None
        self.base_identity: dict[str, Any] = {}  # a LoRA run's base, in each checkpoint's meta
        self.tracker = tracking.start(config, self.out)  # last: run() finishes it
        self.eval_writer = EvalWriter(self.out / "logs", bool(config.train.get("tensorboard", True)),
                                      self.tracker)

    def resume(self) -> Position:
        """Where to start: the newest checkpoint's position, or the beginning."""
        pos = Position()
        restored = self.ckpts.restore_latest(self.abstract_state, self.config.to_json())
        if restored is not None:
            state, meta = restored
            k = _check_resume(meta, self.data.phases, self.steps)
            pos = Position(k, self.loaders[k].start_step(meta["data"]), state)
        global_step = self.starts[pos.phase] + pos.step
        events = self.log.rewind(global_step)  # drops undone steps and torn lines
        logged = sorted({(e.get("event"), e.get("phase")) for e in events
                         if e.get("at_phase_end", True)}, key=str)
        self.logged = {tuple(x) for x in distributed.from_process_0(logged)}
        if restored is not None:
            self._replay_tracking(events)
            self.log.write(event="resume", phase=pos.phase + 1, step_in_phase=pos.step,
                           step=global_step)
            _say(f"resuming phase {pos.phase + 1} at step {pos.step}/{self.steps[pos.phase]} "
                 f"(global step {global_step}) from {self.ckpt_dir}")
        if self.trainer.lora is not None:  # the frozen base is in no checkpoint: read it each run
            self.trainer.set_base(_initial_params(
                self.config.model.init_from, model_config(self.config.model),
                self.trainer.base_shardings, self.trainer.lora.base_qtype,
                self.trainer.load_shardings))
            self.base_identity = {"base": base_identity(self.trainer.base,
                                                        self.config.model.init_from)}
            if restored is not None:
                _check_base(restored[1], self.base_identity["base"])
                self._merge_finished(pos.phase)
            else:
                self.initial_params = self._initial_adapters()
        elif restored is None:
            self.initial_params = _initial_params(self.config.model.init_from,
                                                  model_config(self.config.model),
                                                  self.trainer.param_shardings)
        return pos

    def _merge_finished(self, phase: int) -> None:
        """`merge_each_phase`, on resume: the base as the killed run had it in phase `phase`,
        every earlier phase's adapters (its `phases/` directory, written before any later
        checkpoint) merged in order, by the same function as then, so bitwise the same."""
        if not self.merge_each:
            return
        for j in range(phase):
            path = self.out / "phases" / _label(j, self.data.phases[j])
            try:
                _, adapters = load_adapter(path, self.trainer.model_cfg)
            except AdapterError as e:
                raise UsageError(f"resuming a model.lora.merge_each_phase run needs each finished "
                                 f"phase's adapters to rebuild its base: {e}") from None
            self.trainer.merge_into_base(adapters)
        if phase:
            _say(f"merged phases 1-{phase}'s adapters into the base again (merge_each_phase)")

    def _initial_adapters(self) -> Any:
        """`model.lora.init_from`'s PEFT adapter (its rank, alpha and targets must be the
        config's), or None: fresh adapters (A random, B zero)."""
        path = self.config.model.lora.get("init_from", "")
        if not path:
            return None
        try:
            spec, adapters = load_adapter(path, self.trainer.model_cfg)
        except AdapterError as e:
            raise UsageError(f"model.lora.init_from: {e}") from None
        want = self.trainer.lora
        for name, got, mine in (("rank", spec.rank, want.rank), ("alpha", spec.alpha, want.alpha),
                                ("targets", spec.targets, want.targets)):
            if got != mine:
                raise UsageError(f"model.lora.init_from {path}: the adapter's {name} is {got!r}, "
                                  f"the config's model.lora.{name} is {mine!r}; set "
                                  f"--config.model.lora.{name} to match the adapter")
        return adapters

    def _replay_tracking(self, events: list[dict[str, Any]]) -> None:
        """W&B gets again what the killed attempts logged up to the checkpoint (`events`: the
        rewound phase log; `tracking` says why)."""
        if self.tracker.run is None:
            return
        metrics, _ = read_events(self.out / "logs" / "metrics.jsonl")  # rewound, torn lines gone
        self.tracker.replay(metrics)
        for e in events:
            k = int(e.get("phase", 0)) - 1
            if not 0 <= k < len(self.steps):
                continue
            label = _label(k, self.data.phases[k])
            if e.get("event") == "phase_start":
                self.tracker.phase_start(k + 1, label, self.starts[k] + 1,
                                         self.starts[k] + int(e.get("from_step", 0)) + 1)
            elif e.get("event") == "eval" and e.get("at_phase_end", True):
                self.tracker.eval_summary(label, _eval_scalars(e))
            elif e.get("event") == "phase_end":
                self.tracker.phase_end(k + 1, label, e["step"])

    def _start_state(self, k: int, pos: Position) -> Any:
        self.trainer.set_phase(k)
        if pos.state is not None and pos.step >= self.steps[k]:
            return pos.state  # resumed at this phase's end: only what the phase owes is left
        if pos.state is not None and (pos.step > 0 or self.carry):
            # mid-phase (or carried): optimizer state and step count continue
            if self.carry:
                return self.trainer.with_run_length(pos.state, self.starts[-1])
            return pos.state
        params = pos.state.params if pos.state is not None else self.initial_params
        length = self.starts[-1] if self.carry else self.steps[k]
        if self.merge_each and k > 0:  # the last phase's adapters are in the base: fresh ones
            return self.trainer.init_state(length, rng=jax.random.fold_in(
                jax.random.key(self.trainer.seed), k))
        return self.trainer.init_state(length, params=params)

    def train_phase(self, k: int, pos: Position) -> Any:
        """Phase k's steps from `pos.step` on, checkpointed; returns the phase-end state."""
        state, first = self._start_state(k, pos), pos.step
        if first >= self.steps[k]:
            return state
        phase, loader, start = self.data.phases[k], self.loaders[k], self.starts[k]
        self.log.write(event="phase_start", phase=k + 1, name=phase.phase.name,
                       steps=self.steps[k], from_step=first, examples=len(phase.examples),
                       replayed=phase.replayed)
        replayed = f" (+{phase.replayed} replayed)" if phase.replayed else ""
        _say(f"phase {k + 1}/{len(self.steps)} ({phase.phase.name}): {phase.own} examples"
             f"{replayed}, {self.steps[k]} steps, "
             + (f"from its first step (global step {start + 1})" if first == 0 else
                f"resuming at step {first + 1} of {self.steps[k]} (global step {start + first + 1})"))
        self.tracker.phase_start(k + 1, _label(k, phase), start + 1, start + first + 1)
        every = int(self.config.checkpoint.every_steps)
        eval_every = int(self.config.train.eval_every)
        writer = make_writer(self.trainer, int(self.config.data.max_length), self.out / "logs",
                             self.steps[k] - first,
                             prefix=_label(k, phase), step_offset=start, tracker=self.tracker)
        logs = str(self.out / "logs")  # metrics, TensorBoard, the phase log: a full disk is one line
        try:
            for s in range(first, self.steps[k]):
                batch = self.trainer.shard_batch(loader.batch(s))
                state, metrics = self.trainer.step(state, batch)
                with _storage(logs):
                    writer.write(s + 1, metrics)
                    self.log.write(event="step", phase=k + 1, step_in_phase=s + 1,
                                   step=start + s + 1)
                done = s + 1 == self.steps[k]
                if not done and eval_every > 0 and (start + s + 1) % eval_every == 0:
                    # before the step's checkpoint: a kill between the two redoes the eval
                    with _storage(logs):
                        self.evaluate(k, state.params, start + s + 1, at_phase_end=False)
                saved = done or (every > 0 and (s + 1) % every == 0)
                if saved:
                    self._save(k, s + 1, state)
                for hook in self.hooks:
                    hook(self, k, s + 1)
                if self.notice is not None and self.notice.reached(start + s + 1):
                    self.stop_preempted(k, s + 1, state, saved)
        finally:  # the progress bar ends its line before any error is printed
            with _storage(logs):
                writer.close()
        return state

    def _save(self, k: int, step: int, state: Any) -> None:
        """Start saving phase k's state after its `step`-th step (async: it commits later)."""
        done = step == self.steps[k]
        with _storage(self.ckpt_dir, self.state_bytes):
            self.ckpts.save(self.starts[k] + step, state,
                            {**_meta(self.config, k, step, self.loaders[k], self.data.phases[k],
                                     done), **self.base_identity})

    def stop_preempted(self, k: int, step: int, state: Any, saved: bool) -> None:
        """At the agreed point after a preemption notice (phase k, its `step`-th step done):
        the checkpoint there (unless one is on its way), committed; a `preempted` line."""
        if not saved:
            self._save(k, step, state)
        with _storage(self.ckpt_dir, self.state_bytes):
            self.ckpts.close()  # waits for the commit
        where = self.starts[k] + step
        self.log.write(event="preempted", phase=k + 1, step_in_phase=step, step=where)
        self.log.close()
        raise preemption.Preempted(
            f"preempted at global step {where} (phase {k + 1}, step {step}); checkpoint saved; "
            "rerun the same command to resume")

    def finish_phase(self, k: int, state: Any) -> None:
        """What phase k owes at its end, each part done unless the log shows it done: its eval
        loss, its `phases/<label>` params (also redone if incomplete), its `phase_end` line."""
        phase, end = self.data.phases[k], self.starts[k + 1]
        if ("eval", k + 1) not in self.logged:
            with _storage(str(self.out / "logs")):
                self.evaluate(k, state.params, end, at_phase_end=True)
        target = self.out / "phases" / _label(k, phase)
        if self.config.checkpoint.phase_params and not distributed.from_process_0(
                ("phase_end", k + 1) in self.logged and _phase_complete(target, self.trainer)):
            with _storage(str(target)):
                if self.trainer.lora is not None:  # a PEFT adapter of the base
                    adapters = distributed.to_host(state.params)
                    if jax.process_index() == 0:
                        earlier = [_label(j, self.data.phases[j]) for j in range(k)]
                        save_adapter(target, self.trainer.model_cfg, self.trainer.lora, adapters,
                                     base=self.config.model.init_from,
                                     merged_first=earlier if self.merge_each else ())
                else:
                    save_params(target, self.trainer.model_cfg, state.params, overwrite=True,
                                extra_files=tokenizer_files(self.config.data.tokenizer))
        if self.merge_each and k + 1 < len(self.steps):  # the final adapters are exported
            self.trainer.merge_into_base(state.params)
            _say(f"merged phase {k + 1}'s adapters into the base; phase {k + 2} trains fresh ones")
        if ("phase_end", k + 1) not in self.logged:
            self.log.write(event="phase_end", phase=k + 1, name=phase.phase.name, step=end)
            self.tracker.phase_end(k + 1, _label(k, phase), end)

    def evaluate(self, k: int, params: Any, step: int, at_phase_end: bool) -> None:
        """Each stage's held-out loss (the forgetting matrix's row after phase k when
        `at_phase_end`) and `data.eval_path`'s, at global `step`: phase log, metrics, console."""
        sets = [(se.stage.name, se.examples) for se in self.data.stage_evals if len(se.examples)]
        if self.data.eval_examples is not None and len(self.data.eval_examples):
            sets.append(("", self.data.eval_examples))
        if not sets:
            return
        t = time.perf_counter()
        sums = {name: self._eval_sums(k, params, ex) for name, ex in sets}
        stage = {n: ce / max(tok, 1.0) for n, (ce, tok) in sums.items() if n}
        event: dict[str, Any] = {"phase": k + 1, "name": self.data.phases[k].phase.name,
                                 "step": step, "at_phase_end": at_phase_end}
        if stage:
            ce, tok = (sum(sums[n][i] for n in stage) for i in (0, 1))
            event.update(stage_losses=stage, heldout_loss=ce / max(tok, 1.0),
                         trained_stages=_score_stages(self.data.phases[k]))
        if "" in sums:
            event["eval_loss"] = sums[""][0] / max(sums[""][1], 1.0)
        event["seconds"] = round(time.perf_counter() - t, 4)
        self.log.write(event="eval", **event)
        scalars = _eval_scalars(event)
        self.eval_writer.write(step, scalars)
        if at_phase_end:
            self.tracker.eval_summary(_label(k, self.data.phases[k]), scalars)
        shown = [f"stage {n} {v:.4f}" for n, v in stage.items()]
        if "eval_loss" in event:
            shown.append(f"data.eval_path {event['eval_loss']:.4f}")
        where = f"phase {k + 1} end" if at_phase_end else f"step {step}"
        _say(f"eval loss at {where}: {', '.join(shown)} ({event['seconds']:.1f}s)")

    def _eval_sums(self, k: int, params: Any, examples: Any) -> tuple[float, float]:
        loader = self.batching.loader(examples, k, jax.process_index(), jax.process_count(),
                                      evaluation=True)
        return _eval_sums(self.trainer, params, loader)

    def close(self) -> None:
        self.eval_writer.close()
        with _storage(self.ckpt_dir, self.state_bytes):
            self.ckpts.close()

    def finish_run(self, final: Any) -> None:
        """The HF export (unless a finished run already wrote it whole) and the `done` line."""
        finished = ("done", None) in self.logged
        if self.config.export.at_end:
            if finished and distributed.from_process_0(hf.export_complete(self.hf_dir)):
                _say(f"the run was already complete; its final model is in {self.hf_dir}")
            else:
                self._export_final(final.params)
        if not finished:
            self.log.write(event="done", step=self.starts[-1])
        self.log.close()
        self.write_forgetting()

    def _export_final(self, params: Any) -> None:
        """The final model: the HF export, or with LoRA per `export.lora` the merged model in
        `hf/` and/or the PEFT adapter in `adapter/`."""
        trainer, what = self.trainer, self.config.export.get("lora", "merged")
        if trainer.lora is None:
            _export(self.config.export.dtype, trainer.model_cfg, params, self.data.tokenizer,
                    self.hf_dir)
            return
        if what in ("adapter", "both"):
            adapters = distributed.to_host(params)
            if jax.process_index() == 0:
                path = save_adapter(self.out / "adapter", trainer.model_cfg, trainer.lora,
                                    adapters, base=self.config.model.init_from)
                _say(f"exported the LoRA adapter (PEFT) to {path}")
        if what in ("merged", "both"):
            base, shardings = trainer.base, trainer.base_shardings
            if trainer.lora.base_qtype:  # merged into the base as it was, not its codes
                trainer.base = base = None  # the codes' memory first
                shardings = trainer.load_shardings
                base = _initial_params(self.config.model.init_from, trainer.model_cfg, shardings)
            merged = jax.jit(functools.partial(lora_merge, trainer.model_cfg, trainer.lora),
                             out_shardings=shardings)(base, params)
            _export(self.config.export.dtype, trainer.model_cfg, merged, self.data.tokenizer,
                    self.hf_dir)

    def write_forgetting(self) -> None:
        """`forgetting.csv` and `.md` from the phase log's phase-end evals (process 0)."""
        if not self.data.stage_evals or jax.process_index() != 0:
            return
        events, _ = read_events(self.log.path)
        heldout = {"stages": [{"stage": s.stage.name, "label": s.stage.label}
                              for s in self.data.stage_evals]}
        matrix = forgetting.from_events(events, heldout)
        with _storage(str(self.out)):
            _, md = matrix.write(self.out)
        _say(f"forgetting matrix ({len(matrix.rows)} phases x {len(matrix.stages)} stages, mean "
             f"backward transfer {matrix.mean_backward_transfer():+.4f}) in {md}")


def _label(k: int, phase: Any) -> str:
    """`phase<k>-stage<s>` (or `phase<k>-<name>`): the phase's name under `phases/`."""
    name = phase.phase.name
    return f"phase{k + 1}-" + (f"stage{name}" if name[0].isdigit() else name)


def _export(dtype: str, model_cfg: ModelConfig, params: Any, tokenizer: Any, hf_dir: str) -> None:
    """Every process takes part (one layer slice gathered at a time); process 0 writes."""
    export_cfg = model_cfg.replace(param_dtype=dtype, dtype=dtype)
    hf.save(hf_dir, Transformer(export_cfg), params, tokenizer=tokenizer, overwrite=True)
    _say(f"exported the final model to {hf_dir}")


@contextlib.contextmanager
def _storage(path: str, needed_bytes: int | None = None) -> Iterator[None]:
    """A full disk under `path` becomes one clear line (the run resumes once there is space)."""
    try:
        yield
    except Exception as e:
        error = io_errors.disk_full_error(e, path, needed_bytes)
        if error is None:
            raise
        raise CheckpointError(f"{error}; then rerun the same command: it resumes from the last "
                              "complete checkpoint") from None


def _meta(config: ConfigDict, k: int, step: int, loader: Any, phase: Any, done: bool) -> dict:
    return {"phase_index": k, "phase_name": phase.phase.name, "step_in_phase": step,
            "phase_done": done, "data": loader.state_dict(step), "config": config.to_json()}


def base_identity(base: Any, path: str) -> dict[str, Any]:
    """What names a LoRA run's frozen base: its path and a hash of its tree's shapes and of a
    few of its weights (an embedding row, layer 0's q/k/v at one input), so adapters are never
    resumed onto another base."""
    attn = "qkv" if "qkv" in base["layers"]["attn"] else "qkv_q"  # a QLoRA base: its codes
    probe = distributed.to_host(jax.jit(lambda b: (b["embed"][0], b["layers"]["attn"][attn][0, 0]))(
        base))
    h = hashlib.sha256(json.dumps([(jax.tree_util.keystr(p), list(x.shape), str(x.dtype))
                                   for p, x in jax.tree_util.tree_flatten_with_path(base)[0]])
                       .encode())
    for x in jax.tree.leaves(probe):
        h.update(np.ascontiguousarray(x).tobytes())
    return {"path": str(path), "sha256": h.hexdigest()[:16]}


def _check_base(meta: dict, base: dict[str, Any]) -> None:
    """Refuse to resume adapters onto a base other than the one they were trained on."""
    saved = meta.get("base")
    if saved and saved.get("sha256") != base["sha256"]:
        raise UsageError(f"the checkpoint's adapters were trained on the base {saved['path']} "
                          f"(fingerprint {saved['sha256']}), but model.init_from={base['path']} "
                          f"gives fingerprint {base['sha256']}: point model.init_from at the "
                          "run's base, or use a new output_dir")


def _check_resume(meta: dict, phases: list, steps: list[int]) -> int:
    """The checkpoint's phase index, after checking this config has the same phases there.

    The loader's `start_step` then checks the data position itself (examples, seed, step).
    """
    k = int(meta["phase_index"])
    if k >= len(phases) or meta["phase_name"] != phases[k].phase.name:
        raise ConfigError(f"the checkpoint is from phase {k + 1} ({meta['phase_name']}) but this "
                          f"config's phases are {[p.phase.name for p in phases]}: the data or "
                          "data.order changed; use a new output_dir or checkpoint.dir")
    if int(meta["data"]["steps"]) != steps[k]:
        raise ConfigError(f"the checkpoint's phase {k + 1} has {meta['data']['steps']} steps, "
                          f"this config's has {steps[k]}: batch size, epochs or data changed")
    return k


def _eval_sums(trainer: Any, params: Any, loader: Any) -> tuple[float, float]:
    """(summed response-token CE, token count) over one pass of an evaluation loader."""
    ce, tokens = 0.0, 0.0
    for s in range(loader.steps):
        m = jax.device_get(trainer.eval_loss(params, trainer.shard_batch(loader.batch(s))))
        ce, tokens = ce + float(m["ce_sum"]), tokens + float(m["loss_tokens"])
    return ce, tokens


def _phase_complete(target: Path, trainer: Trainer) -> bool:
    """Whether a phase's `phases/` output is whole (params, or a LoRA run's adapter)."""
    if trainer.lora is None:
        return params_complete(target)
    return adapter_complete(target)


def _score_stages(phase: Any) -> list[int]:
    """The score stages a phase trains on; none for one-off and random stages."""
    return list(phase.phase.stages) if phase.phase.name[0].isdigit() else []


def _eval_scalars(event: dict[str, Any]) -> dict[str, float]:
    """An eval event's losses under their metric names (`eval/<name>` once tagged)."""
    out = {metric_name(n): v for n, v in event.get("stage_losses", {}).items()}
    if "heldout_loss" in event:
        out["heldout_loss"] = event["heldout_loss"]
    if "eval_loss" in event:
        out["eval_path_loss"] = event["eval_loss"]
    return out
