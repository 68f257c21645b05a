"""The paper's configs compiled for TPU slices with libtpu's compiler, on this machine (no TPU).

    .venv/bin/python benchmarks/tpu_compile.py [--models llama2-7b,...] [--variants all|ends]
                                               [--batches 256,512,1024]

For each paper config on the slice it names: XLA's peak per device of the exact train step
with `xla` vs `splash` attention and the full vs chunked loss (`train.loss_chunk`), the
planner's estimate and its error against XLA, and the compile time; then the largest global
batch at seq 2048 without gradient accumulation that fits with splash + chunked loss (a few
compiles up a doubling ladder, not an exhaustive search). A step that does not fit fails to
compile, so its peak column shows what the compiler said it needed. Not part of `make test`
(each 7B compile takes minutes on two cores).

The LoRA and QLoRA configs (configs/lora/, `LORA`) compile once each, as they are (their
slice, attention, loss chunk and `train.grad_accum`), the planner modelling the frozen base:

    .venv/bin/python benchmarks/tpu_compile.py --models llama2-70b-lora,llama2-70b-qlora,llama3-8b-lora
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

from phased_jax import sharding  # noqa: E402
from phased_jax.accelerators import parse_tpu  # noqa: E402
from phased_jax.config import model_config  # noqa: E402
from phased_jax.config_cli import load_config_file  # noqa: E402
from phased_jax.model.lora import spec_from_section  # noqa: E402
from phased_jax.train.compile import GiB, compile_for_tpu  # noqa: E402
from phased_jax.train.plan import make_plan  # noqa: E402

print = functools.partial(print, flush=True)  # progress shows while the compiles run

# model -> (config file, ((slice, mesh.shape override or None: the config's own), ...)).
# 70B: the config's pure FSDP (what `phased-jax plan` suggests: the least tensor parallelism
# that fits) and FSDP x 8-way tensor parallelism (the README's example).
PAPER = {
    "llama2-7b": ("configs/llama2_7b_phased.py", (("v5p-8", None), ("v5p-16", None))),
    "llama2-13b": ("configs/llama2_13b_phased.py", (("v5p-16", None),)),
    "mistral-7b": ("configs/mistral_7b_phased.py", (("v5p-8", None),)),
    "llama2-70b": ("configs/llama2_70b_phased.py", (("v5p-128", None), ("v5p-128", (1, -1, 8)))),
    "llama3-8b": ("configs/llama3_8b_phased.py", (("v5p-8", None), ("v5p-16", None))),
    "llama3-70b": ("configs/llama3_70b_phased.py", (("v5p-128", None),)),
}
# LoRA / QLoRA configs, each compiled once as it is, on the slice its docstring names.
LORA = {
    "llama2-70b-lora": ("configs/lora/llama2_70b_phased_lora.py", "v5p-8"),
    "llama2-70b-qlora": ("configs/lora/llama2_70b_phased_qlora.py", "v5e-8"),
    "llama3-8b-lora": ("configs/lora/llama3_8b_phased_lora.py", "v5e-4"),
}
LOSS_CHUNK = 512  # tokens of the sequence per chunk in the chunked-loss rows
VARIANTS = {
    "all": (("xla", 0), ("splash", 0), ("xla", LOSS_CHUNK), ("splash", LOSS_CHUNK)),
    "ends": (("xla", 0), ("splash", LOSS_CHUNK)),  # before / after
}


def config_path(model: str) -> str:
    return LORA[model][0] if model in LORA else PAPER[model][0]


def configure(path: str, mesh_shape, attention: str, loss_chunk: int, batch: int | None = None):
    config = load_config_file(path)
    config.model.attention_impl = attention
    config.train.loss_chunk = loss_chunk
    if mesh_shape is not None:
        config.mesh.shape = tuple(mesh_shape)
    if batch is not None:
        config.train.global_batch = batch
    return config


def needed_gib(shortfall: str) -> float:
    """What the compiler said it needed, from its out-of-memory message (GiB)."""
    sizes = re.findall(r"\(([\d.]+)G\)", shortfall)
    return float(sizes[0]) if sizes else float("nan")


def planned_gib(config, tpu_name: str) -> float:
    """The planner's per-device total for `config` on the slice (no compile)."""
    tpu = parse_tpu(tpu_name)
    mesh = sharding.mesh_sizes(config.mesh, tpu.chips)
    plan = make_plan(model_config(config.model), config.train, mesh,
                     sharding.rules_from_config(config.mesh), int(config.data.max_length),
                     device=tpu.generation, lora=spec_from_section(config.model.get("lora")))
    return plan.total / GiB


def row(model: str, tpu_name: str, config, attention: str, loss_chunk: int, mesh_shape) -> dict:
    """XLA's figures for one compile (what --save keeps; the plan is recomputed on --load)."""
    tpu = parse_tpu(tpu_name)
    result = compile_for_tpu(config, tpu, steps=("train",))
    step = result.steps[0]
    return dict(model=model, slice=tpu_name, mesh="x".join(str(v) for v in result.mesh.values()),
                mesh_shape=mesh_shape, attention=attention, loss_chunk=loss_chunk,
                batch=int(config.train.global_batch), grad_accum=int(config.train.grad_accum),
                peak=step.peak / GiB if step.fits else needed_gib(step.shortfall),
                fits=step.fits, hbm=tpu.hbm_gib, compile_s=step.compile_s)


def with_plan(r: dict) -> dict:
    config = configure(config_path(r["model"]), r.get("mesh_shape"), r["attention"],
                       r["loss_chunk"], r["batch"])
    plan = planned_gib(config, r["slice"])
    return {**r, "plan": plan, "err": (plan - r["peak"]) / r["peak"]}


HEADER = (f"{'model':<16} {'slice':<8} {'mesh d.f.t':<10} {'attention':<9} {'loss':<9} "
          f"{'batch':>5} {'accum':>5} {'XLA peak':>9} {'fits':>5} {'plan':>8} {'plan err':>8} "
          f"{'compile':>8}")


def show(r: dict) -> str:
    peak = f"{r['peak']:7.1f}G" if r["fits"] else f">{r['peak']:6.1f}G"
    loss = "full" if not r["loss_chunk"] else f"chunk {r['loss_chunk']}"
    return (f"{r['model']:<16} {r['slice']:<8} {r['mesh']:<10} {r['attention']:<9} {loss:<9} "
            f"{r['batch']:>5} {r.get('grad_accum', 1):>5} {peak:>9} {'yes' if r['fits'] else 'NO':>5} {r['plan']:7.1f}G "
            f"{r['err']:+8.1%} {r['compile_s']:7.0f}s")


def compile_rows(models: list[str], variants: str, batches: list[int], done: list[dict],
                 save: Path | None = None) -> list[dict]:
    """Every row of `models` not in `done` (a saved run), printed (and saved) as it finishes."""
    key = lambda r: (r["model"], r["slice"], r["mesh"], r["attention"], r["loss_chunk"],
                     r["batch"])
    have = {key(r): r for r in done}
    rows = []

    def add(model, tpu_name, mesh_shape, attention, chunk, batch=None):
        config = configure(config_path(model), mesh_shape, attention, chunk, batch)
        mesh = "x".join(str(v) for v in sharding.mesh_sizes(
            config.mesh, parse_tpu(tpu_name).chips).values())
        k = (model, tpu_name, mesh, attention, chunk, int(config.train.global_batch))
        r = have.get(k) or row(model, tpu_name, config, attention, chunk, mesh_shape)
        rows.append(with_plan(r))
        print(show(rows[-1]))
        if save:
            fresh = {key(x): x for x in done + rows}
            save.write_text(json.dumps([{k: v for k, v in x.items() if k not in ("plan", "err")}
                                        for x in fresh.values()], indent=1))
        return rows[-1]

    for model in models:
        if model in LORA:  # as configured: its attention ("auto": splash), loss chunk, accum
            path, tpu_name = LORA[model]
            own = load_config_file(path)
            add(model, tpu_name, None, own.model.attention_impl, int(own.train.loss_chunk))
            continue
        _, targets = PAPER[model]
        for tpu_name, mesh_shape in targets:
            first = len(rows)
            for attention, chunk in VARIANTS[variants]:
                add(model, tpu_name, mesh_shape, attention, chunk)
            largest = max((r["batch"] for r in rows[first:] if r["fits"]
                           and r["attention"] == "splash" and r["loss_chunk"]), default=None)
            for batch in batches:
                if largest is None or batch <= largest:
                    continue
                if not add(model, tpu_name, mesh_shape, "splash", LOSS_CHUNK, batch)["fits"]:
                    break
                largest = batch
            print(f"  -> {model} on {tpu_name} ({rows[-1]['mesh']}): largest global batch x 2048 that fits with splash "
                  f"+ chunked loss, no accumulation: {largest or 'none of those tried'}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join([*PAPER, *LORA]), help="comma-separated, from: "
                   + ", ".join([*PAPER, *LORA]))
    p.add_argument("--variants", choices=sorted(VARIANTS), default="all")
    p.add_argument("--batches", default="256,512,1024",
                   help="global batches to try (seq 2048, no accumulation) for the largest fit")
    p.add_argument("--save", type=Path, help="keep XLA's figures here (JSON); rows already in "
                   "the file are not compiled again, so an interrupted run continues")
    args = p.parse_args()
    done = json.loads(args.save.read_text()) if args.save and args.save.exists() else []
    print(HEADER)
    rows = compile_rows(args.models.split(","), args.variants,
                        [int(b) for b in args.batches.split(",") if b], done, args.save)
    fitted = [r for r in rows if r["fits"]]
    if fitted:
        worst = max(fitted, key=lambda r: abs(r["err"]))
        print(f"planner vs XLA over {len(fitted)} compiled rows: worst {worst['err']:+.1%} "
              f"({worst['model']} {worst['slice']} {worst['attention']} chunk "
              f"{worst['loss_chunk']} batch {worst['batch']})")


if __name__ == "__main__":
    main()
