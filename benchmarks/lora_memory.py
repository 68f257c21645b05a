"""Per-device memory of Llama-2 7B full fine-tuning, LoRA and QLoRA (int8, nf4): the planner's
figure and XLA's peak for the same step, compiled for a TPU slice on this machine (no TPU).

    .venv/bin/python benchmarks/lora_memory.py [--tpu v5p-8] [--grad-accum 1] [--save F.json]

Every arm is configs/llama2_7b_phased.py (global batch 128 x 2048, splash attention, loss chunk
512, remat `full`, pure FSDP) at the same `train.grad_accum`; LoRA arms add rank-16 adapters on
q, k, v, o, gate, up, down over a frozen base in bfloat16 (LoRA) or int8 / nf4 codes with a
float32 absmax per block of 64 (QLoRA). Full fine-tuning keeps the paper's float32 parameters
and moments. Prints per device: the planner's params (base + adapters), gradients, AdamW
moments and activations, its total, XLA's peak and planner / XLA. Not part of `make test`
(each compile takes minutes on two cores); `--save` keeps XLA's figures so a stopped run
continues.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from phased_jax.accelerators import parse_tpu  # noqa: E402
from phased_jax.config_cli import load_config_file  # noqa: E402
from phased_jax.train.compile import GiB, compile_for_tpu  # noqa: E402

print = functools.partial(print, flush=True)

CONFIG = "configs/llama2_7b_phased.py"
# arm -> base_qtype ("" = bf16 base), or None: full fine-tuning
ARMS = {"full": None, "lora": "", "qlora-int8": "int8", "qlora-nf4": "nf4"}


def arm_config(arm: str, grad_accum: int):
    c = load_config_file(CONFIG)
    c.train.grad_accum = grad_accum
    qtype = ARMS[arm]
    if qtype is not None:
        c.model.param_dtype = "bfloat16"  # the frozen base (adapters and moments stay float32)
        c.model.lora.update(rank=16, alpha=32.0, targets="q,k,v,o,gate,up,down",
                            base_qtype=qtype)
    return c


def measure(arm: str, tpu_name: str, grad_accum: int) -> dict:
    result = compile_for_tpu(arm_config(arm, grad_accum), parse_tpu(tpu_name), steps=("train",))
    step, plan = result.steps[0], result.plan
    return dict(arm=arm, tpu=tpu_name, grad_accum=grad_accum, fits=step.fits,
                xla=step.peak / GiB if step.fits else float("nan"), compile_s=step.compile_s,
                params=plan.params / GiB, base=plan.base / GiB, grads=plan.grads / GiB,
                opt=plan.opt_state / GiB, acts=plan.activations / GiB, plan=plan.total / GiB,
                trainable=plan.trainable_params)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tpu", default="v5p-8")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--arms", default=",".join(ARMS), help="from: " + ", ".join(ARMS))
    p.add_argument("--save", type=Path, help="XLA's figures (JSON); arms already there are not "
                   "compiled again")
    args = p.parse_args()
    done = json.loads(args.save.read_text()) if args.save and args.save.exists() else []
    have = {(r["arm"], r["tpu"], r["grad_accum"]): r for r in done}
    print(f"Llama-2 7B on {args.tpu}, global batch 128 x 2048, grad_accum {args.grad_accum}; "
          "GiB per device")
    print(f"{'arm':<11} {'trainable':>13} {'params':>7} {'(base)':>7} {'grads':>6} {'adam':>6} "
          f"{'acts':>6} {'plan':>7} {'XLA peak':>9} {'plan/XLA':>8} {'compile':>8}")
    for arm in args.arms.split(","):
        r = have.get((arm, args.tpu, args.grad_accum)) or measure(arm, args.tpu, args.grad_accum)
        have[(arm, args.tpu, args.grad_accum)] = r
        if args.save:
            args.save.write_text(json.dumps(list(have.values()), indent=1))
        print(f"{arm:<11} {r['trainable']:>13,} {r['params']:7.2f} {r['base']:7.2f} "
              f"{r['grads']:6.2f} {r['opt']:6.2f} {r['acts']:6.2f} {r['plan']:7.2f} "
              f"{r['xla']:9.2f} {r['plan'] / r['xla']:8.3f} {r['compile_s']:7.0f}s")


if __name__ == "__main__":
    main()
