"""`phased-jax train --config configs/X.py`: the phases of one experiment, in order, resumable.

For each phase in the config's order: restore-or-init, a fresh optimizer and LR schedule sized
to the phase (the paper's way; `train.carry_optimizer` keeps one across phases), the phase's
epochs of steps, a checkpoint every `checkpoint.every_steps` and at the phase's end, eval loss
on held-out data if any. Running the same command again resumes from the newest checkpoint that
restores: the data loader is indexed by step, so the checkpoint's (phase, step) is the whole
data position and the resumed run is bitwise the uninterrupted one.

Files under `output_dir`: `checkpoints/<global step>/` (Orbax; phase ends kept for good),
`phases/phase<k>_<name>/` (phase-end params, `phased-jax convert` exports them to HF),
`logs/metrics.jsonl` + `logs/tensorboard/`, `logs/phase_log.jsonl` (one line per step run),
`hf/` (the final model in HF format), `data_report.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from phased_jax import distributed, fileio
from phased_jax.checkpoint import RunCheckpoints
from phased_jax.config import model_config, parse_config_argv, validate_config
from phased_jax.errors import CheckpointError, ConfigError
from phased_jax.train.runlog import RunLog

# Test hook: SIGKILL this process right after the given global step (and its checkpoint save
# has started), as a preempted host would die. Used by tests/train/test_runner.py.
FAULT_ENV = "PHASED_FAULT_AFTER_STEP"

USAGE = """usage: phased-jax train --config CONFIG_FILE [--config.SECTION.FIELD=VALUE ...]
                       [--local-pod N [--local-devices D]] [--distributed]

Runs the config's phases in order; rerun the same command to resume from the latest checkpoint.
  --local-pod N      run as N local CPU processes joined by jax.distributed (tests a pod)
  --local-devices D  fake CPU devices per local process (default 4)
  --distributed      call jax.distributed.initialize() (multi-host pods; launch/tpu.sh sets it)"""


def _define_flags(fv) -> None:
    from absl import flags

    flags.DEFINE_integer("local_pod", 0, "run as N local processes", flag_values=fv)
    flags.DEFINE_integer("local_devices", 4, "fake CPU devices per local process", flag_values=fv)
    flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() on a pod", flag_values=fv)


def _without_local_pod(argv: list[str]) -> list[str]:
    """`argv` (flag names already underscored) less the local-pod flags, for the workers."""
    names = ("--local_pod", "--local_devices")
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in names:
            skip = True  # its value is the next word
        elif a.split("=")[0] not in names:
            out.append(a)
    return out


def main(argv: list[str]) -> int:
    argv = [a.replace("--local-pod", "--local_pod").replace("--local-devices", "--local_devices")
            if a.startswith("--local-") else a for a in argv]
    fv = parse_config_argv(argv, "phased-jax train", USAGE, _define_flags)
    if fv is None:
        return 0
    if fv.local_pod > 0:
        command = [sys.executable, "-m", "phased_jax.cli", "train", *_without_local_pod(argv)]
        return distributed.launch_local_pod(fv.local_pod, command, fv.local_devices)
    distributed.initialize(auto=fv.distributed)
    with fileio.quiet_disk_full_noise():  # Orbax's threads echo a full disk at any moment
        run(fv.config)
    return 0


@dataclasses.dataclass
class Position:
    """Where a run is: the phase (in training order) and the next step to run in it."""

    phase: int = 0
    step: int = 0
    state: Any = None  # the restored train state, when resuming mid-phase or at a phase end


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def _initial_params(config: ConfigDict, trainer: Any) -> Any:
    """Params from `model.init_from` (HF directory or phased-jax params checkpoint), or None."""
    path = config.model.init_from
    if not path:
        return None
    want = model_config(config.model)
    if Path(path, "config.json").is_file():
        from phased_jax import hf

        model, params = hf.load(path, dtype=want.param_dtype, shardings=trainer.param_shardings)
        got = model.cfg
    elif Path(path, "model_config.json").is_file():
        from phased_jax.hf import orbax_params

        got, params = orbax_params.load_params(path, trainer.param_shardings)
    else:
        raise ConfigError(f"model.init_from={path!r} is neither an HF directory (config.json) "
                          "nor a phased-jax params checkpoint (model_config.json)")
    shape_fields = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim")
    diff = {f: (getattr(got, f), getattr(want, f)) for f in shape_fields
            if getattr(got, f) != getattr(want, f)}
    if diff:
        raise ConfigError(f"model.init_from={path!r} has shapes that differ from config.model "
                          f"(checkpoint, config): {diff}; set config.model to match it")
    return params


def run(config: ConfigDict) -> dict[str, Any]:
    """Train every phase of `config` (resuming if checkpoints exist); returns a summary."""
    from phased_jax.data.pipeline import prepare
    from phased_jax.train.metrics import make_writer
    from phased_jax.train.state import Trainer

    validate_config(config)  # again: the demo and tests call run() without the command line
    t_start = time.time()
    out = Path(config.output_dir)
    trainer = Trainer(config)
    data = prepare(config, write_report=jax.process_index() == 0)
    _say(data.summary())
    pidx, pcount = jax.process_index(), jax.process_count()
    loaders = [p.loader(config, pidx, pcount) for p in data.phases]
    steps = [ld.steps for ld in loaders]
    starts = np.concatenate([[0], np.cumsum(steps)]).astype(int).tolist()
    total_steps = starts[-1]
    carry = bool(config.train.carry_optimizer)
    sched_steps = (lambda k: total_steps) if carry else (lambda k: steps[k])

    ckpt_dir = config.checkpoint.dir or str(out / "checkpoints")
    cc = config.checkpoint
    ckpts = RunCheckpoints(str(Path(ckpt_dir).absolute()), keep=int(cc.keep),
                           phase_end_steps=starts[1:], async_save=bool(cc.async_save),
                           restore_retries=int(cc.get("restore_retries", 3)),
                           retry_backoff_s=float(cc.get("retry_backoff_s", 1.0)))
    log = RunLog(out / "logs" / "phase_log.jsonl")

    pos = Position()
    restored = ckpts.restore_latest(trainer.abstract_state(), config.to_json())
    if restored is not None:
        state, meta = restored
        k = _check_resume(meta, data.phases, steps)
        pos = Position(k, loaders[k].start_step(meta["data"]), state)
    global_step = starts[pos.phase] + pos.step
    log.rewind(global_step)  # drops undone steps and torn lines, so appends start whole
    logged = {(e.get("event"), e.get("phase")) for e in log.events()}
    logged = {tuple(x) for x in distributed.from_process_0(sorted(logged, key=str))}
    if restored is not None:
        log.write(event="resume", phase=pos.phase + 1, step_in_phase=pos.step, step=global_step)
        _say(f"resuming phase {pos.phase + 1} at step {pos.step}/{steps[pos.phase]} "
             f"(global step {global_step}) from {ckpt_dir}")
    params = None if pos.state is not None else _initial_params(config, trainer)

    hf_dir = config.export.hf_dir or str(out / "hf")
    fault_step = int(os.environ.get(FAULT_ENV, "-1"))
    reads = None
    if config.data.get("log_reads", False):
        (out / "logs").mkdir(parents=True, exist_ok=True)
        reads = open(out / "logs" / f"reads-process{pidx}.jsonl", "a")  # noqa: SIM115
    for k in range(pos.phase, len(data.phases)):
        phase, loader = data.phases[k], loaders[k]
        name = phase.phase.name
        label = f"phase{k + 1}-" + (f"stage{name}" if name[0].isdigit() else name)
        first = pos.step
        if pos.state is not None and first >= steps[k]:
            state = pos.state  # resumed at this phase's end: only what the phase owes is left
        elif pos.state is not None and (first > 0 or carry):
            state = pos.state  # mid-phase (or carried): optimizer state and step count continue
            if carry:
                state = trainer.with_run_length(state, total_steps)
        else:
            start_params = pos.state.params if pos.state is not None else params
            state = trainer.init_state(sched_steps(k), params=start_params)
        pos = Position()
        if first < steps[k]:
            log.write(event="phase_start", phase=k + 1, name=name, steps=steps[k],
                      from_step=first, examples=len(phase.examples))
            _say(f"phase {k + 1}/{len(data.phases)} ({name}): {len(phase.examples)} "
                 f"examples, {steps[k]} steps, starting at step {first}")
            writer = make_writer(trainer, out / "logs", steps[k] - first, prefix=label,
                                 step_offset=starts[k])
        try:
            for s in range(first, steps[k]):
                state, metrics = trainer.step(state, trainer.shard_batch(loader.batch(s)))
                writer.write(s + 1, metrics)
                log.write(event="step", phase=k + 1, step_in_phase=s + 1, step=starts[k] + s + 1)
                if reads is not None:
                    reads.write(json.dumps({"step": starts[k] + s + 1, "rows": [
                        [] if r is None else phase.examples.record_ids[r].tolist()
                        for r in loader.rows(s)]}) + "\n")
                done = s + 1 == steps[k]
                if done or (config.checkpoint.every_steps > 0
                            and (s + 1) % config.checkpoint.every_steps == 0):
                    with _storage(ckpt_dir):
                        ckpts.save(starts[k] + s + 1, state,
                                   _meta(config, k, s + 1, loader, phase, done))
                if starts[k] + s + 1 == fault_step:  # test hook: die like a preempted host
                    os.kill(os.getpid(), signal.SIGKILL)
        finally:  # the progress bar ends its line before any error is printed
            if first < steps[k]:
                writer.close()
        _finish_phase(config, trainer, data, k, label, state, starts, logged, log, out)
        pos = Position(k + 1, 0, state)
    with _storage(ckpt_dir):
        ckpts.close()
    if reads is not None:
        reads.close()

    final = pos.state
    if final is None:  # nothing left to run: the last checkpoint is the final model
        raise ConfigError("no phase to run: the config's data produced no phases")
    if config.export.at_end:
        from phased_jax.hf import export_complete

        if ("done", None) in logged and distributed.from_process_0(export_complete(hf_dir)):
            _say(f"the run was already complete; its final model is in {hf_dir}")
        else:
            _export(config, trainer, final.params, data.tokenizer, hf_dir)
    if ("done", None) not in logged:
        log.write(event="done", step=total_steps)
    log.close()
    summary = {"phases": [p.phase.name for p in data.phases], "steps": steps,
               "phase_end_steps": starts[1:], "output_dir": str(out), "hf_dir": hf_dir,
               "seconds": time.time() - t_start}
    _say(f"done: {total_steps} steps in {summary['seconds']:.0f}s; outputs in {out}")
    return summary


def _finish_phase(config: ConfigDict, trainer: Any, data: Any, k: int, label: str, state: Any,
                  starts: list[int], logged: set, log: RunLog, out: Path) -> None:
    """What phase k owes at its end, each part done unless a resumed run finds it done:
    its eval loss, its `phases/<label>` params, its `phase_end` line."""
    from phased_jax.data.loader import PhaseLoader
    from phased_jax.hf.orbax_params import params_complete, save_params

    phase = data.phases[k]
    eval_examples = phase.eval_examples if phase.eval_examples is not None else data.eval_examples
    if eval_examples is not None and len(eval_examples) and ("eval", k + 1) not in logged:
        ev = PhaseLoader(eval_examples, trainer.global_batch, 1, int(config.seed), k,
                         jax.process_index(), jax.process_count(),
                         packing=bool(config.data.packing), shuffle=False)
        loss = _eval_loss(trainer, state.params, ev)
        log.write(event="eval", phase=k + 1, step=starts[k + 1], eval_loss=loss)
        _say(f"phase {k + 1} eval loss {loss:.4f}")
    target = out / "phases" / label
    if config.checkpoint.get("phase_params", True) and not distributed.from_process_0(
            ("phase_end", k + 1) in logged and params_complete(target)):
        with _storage(str(target)):
            save_params(target, trainer.model_cfg, state.params, overwrite=True)
    if ("phase_end", k + 1) not in logged:
        log.write(event="phase_end", phase=k + 1, name=phase.phase.name, step=starts[k + 1])


def _export(config: ConfigDict, trainer: Any, params: Any, tokenizer: Any, hf_dir: str) -> None:
    """Every process takes part (one layer slice gathered at a time); process 0 writes."""
    from phased_jax import hf
    from phased_jax.model import Transformer

    export_cfg = trainer.model_cfg.replace(param_dtype=config.export.dtype,
                                           dtype=config.export.dtype)
    hf.save(hf_dir, Transformer(export_cfg), params, tokenizer=tokenizer, overwrite=True)
    _say(f"exported the final model to {hf_dir}")


@contextlib.contextmanager
def _storage(path: str, needed_bytes: int | None = None) -> Iterator[None]:
    """A full disk under `path` becomes one clear line (the run resumes once there is space)."""
    try:
        yield
    except Exception as e:
        error = fileio.disk_full_error(e, path, needed_bytes)
        if error is None:
            raise
        raise CheckpointError(f"{error}; then rerun the same command: it resumes from the last "
                              "complete checkpoint") from None


def _meta(config: ConfigDict, k: int, step: int, loader: Any, phase: Any, done: bool) -> dict:
    return {"phase_index": k, "phase_name": phase.phase.name, "step_in_phase": step,
            "phase_done": done, "data": loader.state_dict(step), "config": config.to_json()}


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


def _eval_loss(trainer: Any, params: Any, loader: Any) -> float:
    ce, tokens = 0.0, 0.0
    for s in range(loader.steps):
        m = jax.device_get(trainer.eval_loss(params, trainer.shard_batch(loader.batch(s))))
        ce, tokens = ce + float(m["ce_sum"]), tokens + float(m["loss_tokens"])
    return ce / max(tokens, 1.0)
