"""The forgetting matrix's eval cost: measured on the demo, projected for the paper's 7B run.

    .venv/bin/python benchmarks/forgetting_cost.py [--demo-out demo_out] [--quick]
        [--eval-fraction 0.05] [--tpu v5p-8] [--mfu 0.4] [--skip-demo | --skip-projection]

At each phase end the runner evaluates the held-out split of every difficulty stage (one pass
in batches of train.global_batch; `PhaseRunner.evaluate`). What that costs against the phase's
training:

- measured: the demo's phased arm (data.order=1,2,3, data.eval_fraction) run through
  `phased_jax.train.runner.run`; from its phase log, each phase's training seconds (its
  `phase_start` line to its last `step` line) and the `seconds` of its phase-end `eval` line.
  Phase 1's times include compiling the train and the eval step.
- projected: the paper's 7B config on a TPU slice. The train and eval steps are compiled here
  with libtpu for the slice and XLA's cost analysis gives their FLOPs per chip. XLA counts a
  loop's body once, so the 32-layer step (its layers are one `nn.scan`) would report about
  one layer's FLOPs; the steps are compiled loop-free instead, with 0 and 1 layers, xla
  attention (splash is a kernel XLA does not count) and no loss chunking, and extrapolated:
  F(L) = F(0) + L * (F(1) - F(0)). Stage sizes: the scored Alpaca file of the config if it is
  here, else the paper's Table 1 (stage 3 counted from the authors' released stage-3 file in
  ../shared/data when present); held out: round(fraction x size) per stage, as
  `phased_jax.data.splits` draws it. Seconds at --mfu of the chip's peak bf16 FLOP/s
  (`phased_jax.accelerators.DEVICES`).

Not part of `make test`: the projection compiles four 7B-shaped steps (4-5 min on 2 shared cores).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from phased_jax.accelerators import TpuSlice, parse_tpu, tpu_devices  # noqa: E402
from phased_jax.config_cli import load_config_file  # noqa: E402
from phased_jax.data.phases import config_phases  # noqa: E402
from phased_jax.data.records import read_config_records  # noqa: E402
from phased_jax.demo.__main__ import QUICK, build_data  # noqa: E402
from phased_jax.demo.base import build_base  # noqa: E402
from phased_jax.demo.config import CORPUS_DOCS, DATA_SIZES, demo_config, pretrain_config  # noqa: E402
from phased_jax.train.runlog import read_events  # noqa: E402
from phased_jax.train.runner import run  # noqa: E402
from phased_jax.train.trainer import build_trainer  # noqa: E402

print = functools.partial(print, flush=True)  # progress shows while the compiles run

REPO = Path(__file__).resolve().parents[1]
# Paper Table 1 (../shared/DESIGN.md): Alpaca 52K records per GPT-4 difficulty stage.
TABLE1_SIZES = {"1": 30_300, "2": 14_700, "3": 6_800}
STAGE3_RELEASE = REPO.parent / "shared" / "data" / "alpaca-scored" / "en-alpaca52k-stage3.jsonl"


@dataclasses.dataclass(frozen=True)
class Measured:
    """One demo phase: its training and phase-end eval wall seconds."""

    phase: int
    train_s: float
    eval_s: float

    @property
    def ratio(self) -> float:
        return self.eval_s / self.train_s


@dataclasses.dataclass(frozen=True)
class Projected:
    """One phase of the paper run: its steps and FLOPs per chip, and its phase-end eval's."""

    phase: int
    stage: str
    train_steps: int
    eval_steps: int
    train_flops: float
    eval_flops: float

    @property
    def ratio(self) -> float:
        return self.eval_flops / self.train_flops


# -- measured: the demo ------------------------------------------------------------------------
def run_demo(demo_out: Path, bench: Path, eval_fraction: float, seed: int, quick: bool) -> Path:
    """The demo's phased arm with held-out stages, in a fresh `<bench>/phased`; its output dir.
    The demo's data and base are built in `demo_out` unless they are there."""
    if not (demo_out / "data" / "train.jsonl").is_file() or not (demo_out / "tokenizer").is_dir():
        sizes, docs = (QUICK["sizes"], QUICK["corpus_docs"]) if quick else (DATA_SIZES, CORPUS_DOCS)
        build_data(demo_out, dict(sizes), docs)
    build_base(pretrain_config(str(demo_out)), demo_out / "base")  # reused while inputs hold
    cfg = demo_config(out_dir=str(demo_out), seed=seed)
    cfg.data.order = "1,2,3"
    cfg.data.eval_fraction = eval_fraction
    cfg.data.cache_dir = str(bench / "token_cache")
    cfg.output_dir = str(bench / "phased")
    cfg.export.at_end = False  # after the last phase: not part of what is timed
    shutil.rmtree(cfg.output_dir, ignore_errors=True)  # a fresh run, not a resume
    run(cfg)
    return Path(cfg.output_dir)


def measured_costs(run_dir: Path) -> list[Measured]:
    """Per phase, from `<run_dir>/logs/phase_log.jsonl` (one attempt, no resume)."""
    log = run_dir / "logs" / "phase_log.jsonl"
    events, _ = read_events(log)
    starts, last_step, evals = {}, {}, {}
    for e in events:
        kind, phase = e.get("event"), e.get("phase")
        if kind == "phase_start":
            starts[phase] = e["time"]
        elif kind == "step":
            last_step[phase] = e["time"]
        elif kind == "eval" and e.get("at_phase_end"):
            evals[phase] = e
    if not starts:
        raise SystemExit(f"{log}: no phase_start line; is this a run's output directory?")
    rows = []
    for phase in sorted(starts):
        e = evals.get(phase, {})
        if "stage_losses" not in e or "seconds" not in e:
            raise SystemExit(
                f"{log}: phase {phase} has no phase-end eval line with 'stage_losses' and "
                "'seconds' ({\"event\": \"eval\", \"at_phase_end\": true, ...}): this runner "
                "predates the forgetting matrix, or data.eval_fraction was 0")
        rows.append(Measured(phase, last_step[phase] - starts[phase], float(e["seconds"])))
    return rows


def demo_heldout(run_dir: Path) -> dict[str, int]:
    """Examples held out per stage, from the run's data_report.json."""
    report = json.loads((run_dir / "data_report.json").read_text())
    if "heldout" not in report:
        raise SystemExit(f"{run_dir}/data_report.json has no 'heldout' section (runner too old)")
    return {s["stage"]: int(s["examples"]) for s in report["heldout"]["stages"]}


# -- projected: the paper run on a TPU slice ------------------------------------------------------
def stage_sizes(config_path: str) -> tuple[dict[str, int], str]:
    """Records per score stage of the paper's data, and where the counts come from."""
    config = load_config_file(config_path)
    if Path(config.data.paths[0]).is_file():
        records, _ = read_config_records(config.data)
        phases = config_phases(records, config.data, int(config.seed))
        return {p.name: p.size for p in phases}, f"stratified {config.data.paths[0]}"
    sizes, source = dict(TABLE1_SIZES), "paper Table 1"
    if STAGE3_RELEASE.is_file():
        with STAGE3_RELEASE.open() as f:
            sizes["3"] = sum(1 for line in f if line.strip())
        source += f"; stage 3 counted in {STAGE3_RELEASE.name}"
    return sizes, source


def compiled_flops(config_path: str, tpu: TpuSlice, layers: int) -> dict[str, float]:
    """XLA's FLOPs per chip of the train and eval steps with `layers` layers and no loop."""
    config = load_config_file(config_path)
    config.model.num_layers = layers
    config.model.attention_impl = "xla"  # splash is a kernel: XLA's count leaves it out
    config.train.loss_chunk = 0  # a chunked loss is a loop: XLA counts one chunk
    trainer = build_trainer(config, devices=tpu_devices(tpu))
    flops = {}
    for name in ("train", "eval"):
        t0 = time.perf_counter()
        cost = trainer.lower(name, int(config.data.max_length)).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops[name] = float(cost["flops"])
        print(f"  compiled {name} step, {layers} layer(s): {flops[name]:.4e} FLOPs per chip "
              f"({time.perf_counter() - t0:.0f} s)")
    return flops


def step_flops(config_path: str, tpu: TpuSlice) -> dict[str, float]:
    """FLOPs per chip of the full-depth train and eval steps: F(0) + L * (F(1) - F(0))."""
    layers = int(load_config_file(config_path).model.num_layers)
    f0, f1 = compiled_flops(config_path, tpu, 0), compiled_flops(config_path, tpu, 1)
    return {k: f0[k] + layers * (f1[k] - f0[k]) for k in f0}


def project(sizes: dict[str, int], order: list[str], fraction: float, batch: int, epochs: int,
            flops: dict[str, float]) -> tuple[list[Projected], dict[str, int]]:
    """Each phase's train and phase-end eval steps and FLOPs; and the held-out count per stage.
    Every phase end evaluates every stage, one pass each, its last batch padded."""
    heldout = {s: int(round(fraction * n)) for s, n in sizes.items()}
    eval_steps = sum(math.ceil(n / batch) for n in heldout.values())
    rows = []
    for k, stage in enumerate(order, 1):
        train_steps = epochs * math.ceil((sizes[stage] - heldout[stage]) / batch)
        rows.append(Projected(k, stage, train_steps, eval_steps, train_steps * flops["train"],
                              eval_steps * flops["eval"]))
    return rows, heldout


# -- the table ----------------------------------------------------------------------------------
def table(measured: list[Measured] | None, demo_held: dict[str, int] | None,
          projected: list[Projected] | None, paper_held: dict[str, int] | None, peak: float,
          mfu: float) -> str:
    """Per phase, the demo's measured cost beside the paper run's projected one; `*_held`:
    examples held out per stage (every phase end evaluates all of them)."""
    seconds = lambda flops: flops / (peak * mfu)
    held = lambda h: "/".join(str(h[s]) for s in sorted(h)) if h else "-"
    lines = [f"{'':6}| {'demo, measured (CPU)':<42}| 7B paper run, projected ({mfu:g} MFU)",
             f"{'phase':<6}| {'train s':>8} {'eval s':>7} {'eval/train':>10} {'held out':>14} | "
             f"{'steps':>5} {'eval st':>7} {'train s':>8} {'eval s':>7} {'eval/train':>10} "
             f"{'held out':>14}"]
    for i in range(max(len(measured or []), len(projected or []))):
        m = measured[i] if measured and i < len(measured) else None
        p = projected[i] if projected and i < len(projected) else None
        left = (f"{m.train_s:8.1f} {m.eval_s:7.2f} {m.ratio:10.2%} {held(demo_held):>14}" if m
                else f"{'-':>8} {'-':>7} {'-':>10} {'-':>14}")
        right = (f"{p.train_steps:5d} {p.eval_steps:7d} {seconds(p.train_flops):8.0f} "
                 f"{seconds(p.eval_flops):7.1f} {p.ratio:10.2%} {held(paper_held):>14}"
                 if p else f"{'-':>5} {'-':>7} {'-':>8} {'-':>7} {'-':>10} {'-':>14}")
        lines.append(f"{i + 1:<6}| {left} | {right}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo-out", type=Path, default=Path("demo_out"),
                   help="the demo's directory: its data, tokenizer and base are reused, or "
                        "built there (default: demo_out, as `make demo`)")
    p.add_argument("--quick", action="store_true", help="build the demo's quick-sized data "
                   "(240 examples, a 320-document base) when --demo-out has none")
    p.add_argument("--bench-dir", type=Path, default=Path("runs/forgetting_cost"),
                   help="the measured run goes to <bench-dir>/phased (deleted first)")
    p.add_argument("--eval-fraction", type=float, default=0.05,
                   help="the demo run's data.eval_fraction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", type=Path, help="read this finished run's phase log instead "
                   "of running the demo")
    p.add_argument("--config", default="configs/llama2_7b_phased.py", help="the paper run")
    p.add_argument("--tpu", default="v5p-8", help="the slice to compile for")
    p.add_argument("--heldout-fraction", type=float, default=0.02,
                   help="the paper run's data.eval_fraction")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed MFU for the seconds")
    p.add_argument("--skip-demo", action="store_true")
    p.add_argument("--skip-projection", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    tpu = parse_tpu(args.tpu)

    measured = demo_held = None
    if not args.skip_demo:
        run_dir = args.run_dir or run_demo(args.demo_out, args.bench_dir, args.eval_fraction,
                                           args.seed, args.quick)
        measured, demo_held = measured_costs(run_dir), demo_heldout(run_dir)
        print(f"demo: {run_dir}; held out per stage {demo_held}")

    projected = paper_held = None
    if not args.skip_projection:
        config = load_config_file(args.config)
        batch, seq = int(config.train.global_batch), int(config.data.max_length)
        layers, epochs = int(config.model.num_layers), int(config.train.epochs_per_phase)
        sizes, source = stage_sizes(args.config)
        print(f"projection: {args.config} on {tpu.name} ({tpu.chips} chips, "
              f"{tpu.peak_flops / 1e12:.0f} TFLOP/s bf16 each), batch {batch} x {seq}")
        flops = step_flops(args.config, tpu)
        projected, paper_held = project(sizes, config.data.order.split(","),
                                        args.heldout_fraction, batch, epochs, flops)
        print(f"  {layers}-layer steps per chip: train {flops['train']:.4e}, eval "
              f"{flops['eval']:.4e} FLOPs = F(0) + {layers} x (F(1) - F(0)) (xla attention "
              f"counts the full L x L products; XLA's count has no remat recompute)")
        print(f"  stages ({source}): {sizes}; held out ({args.heldout_fraction:g} of each): "
              f"{paper_held} = {sum(paper_held.values())}; train steps = {epochs} epochs x "
              f"ceil(rest / {batch}); eval steps per phase end = sum ceil(held out / {batch})")

    print(table(measured, demo_held, projected, paper_held, tpu.peak_flops, args.mfu))
    if measured:
        print("measured: phase 1's train and eval seconds include compiling the steps")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
