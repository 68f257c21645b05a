"""One GPU: our Trainer's train step vs transformers' PyTorch LlamaForCausalLM, Llama-2-7B width.

    .venv/bin/python benchmarks/gpu_train_step.py [--layers N] [--batch 4] [--seq 2048] [--steps 10]
    .venv/bin/python benchmarks/gpu_train_step.py --tiny   # CPU smoke: hidden 64, 2 layers, seq 32
    bash benchmarks/gpu_run.sh                              # a session's one go on a lent H100/H200

The model is Llama-2-7B's width (hidden 4096, 32 heads, MLP 11008, vocab 32000) with as many
layers as fit the card (`--layers`; default from `fit_layers`, lowered by a quarter and retried
on an out-of-memory error). Both sides train the same weights on the same batch: float32
parameters and AdamW moments, bfloat16 compute (ours: `dtype`; torch: autocast, as HF's Trainer
with bf16), loss on every token, clip 1.0, AdamW without decay on the norms, no remat / no
gradient checkpointing. The JAX side is the project's own `Trainer.step` with
`model.attention_impl` auto (cuDNN flash attention on a GPU in bf16, xla on CPU); torch uses
attn_implementation='sdpa'. Its initial weights go to torch through our HF export
(`phased_jax.hf.to_hf.save`), so the first-step losses must agree: the table shows both.

Timing: every step is synchronised (`block_until_ready` / `torch.cuda.synchronize`), warm-up
steps excluded, median of `--steps`. MFU = `flops_per_token` x tokens / step time / the card's
dense bf16 peak (`peak_flops_per_device`, or `--device-peak`). On a GPU each side runs in its own
process, one after the other, so each has the whole card. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from phased_jax.accelerators import DEVICES
from phased_jax.config import get_default_config
from phased_jax.data.tokens import random_batch

print = functools.partial(print, flush=True)  # progress shows under load

WIDTH_7B = dict(vocab_size=32000, hidden_size=4096, num_heads=32, num_kv_heads=32,
                intermediate_size=11008)
# CPU smoke shape. A wide init (std 1) makes the first loss depend on the weights (at std 0.02
# every model's first loss is ~ln(vocab)), so the two sides' first losses agreeing means something.
TINY = dict(vocab_size=32000, hidden_size=64, num_heads=4, num_kv_heads=4, intermediate_size=172,
            num_layers=2, initializer_range=1.0, batch=2, seq=32)
CARD_GIB = DEVICES["h100"][0]  # what the default layer count is sized for
USABLE = 0.8  # of the card: allocator slack, cuDNN/cuBLAS workspaces, torch autocast weight copies
SIDES = ("jax", "torch")
COLUMNS = ("side", "device", "layers", "batch", "seq", "step_s", "tok/s", "MFU", "mem_GiB",
           "loss_1", "loss_last")
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "OutOfMemoryError")


def fit_layers(batch: int, seq: int, card_gib: float = CARD_GIB, dims: dict = WIDTH_7B) -> int:
    """Most layers whose training state and activations fit `USABLE` of the card, by arithmetic.

    Per parameter 16 bytes (float32 weights, gradients and two Adam moments). Per layer and token,
    without remat and with a fused attention kernel (no [L, S] scores kept), the bf16 tensors the
    backward pass reads: 11 x hidden (norm inputs, q/k/v, rotated q/k, attention out, residuals)
    + 4 x intermediate (gate, up, their product, its activation). Plus the float32 logits and
    their gradient and the bf16 logits.
    """
    D, F, V = dims["hidden_size"], dims["intermediate_size"], dims["vocab_size"]
    tokens = batch * seq
    per_layer = 16 * (4 * D * D + 3 * D * F) + 2 * (11 * D + 4 * F) * tokens
    fixed = 16 * 2 * V * D + (4 + 4 + 2) * V * tokens
    return max(1, int((USABLE * card_gib * 2**30 - fixed) // per_layer))


def model_overrides(spec: dict) -> dict[str, Any]:
    """The `model` section's fields for this run's shape."""
    out = {k: spec[k] for k in ("vocab_size", "hidden_size", "num_heads", "num_kv_heads",
                                "intermediate_size", "num_layers")}
    out["head_dim"] = spec["hidden_size"] // spec["num_heads"]  # as transformers derives it
    if "initializer_range" in spec:
        out["initializer_range"] = spec["initializer_range"]
    return out


def run_jax(spec: dict, workdir: Path) -> dict[str, Any]:
    """Our Trainer's steps; writes the initial weights as an HF directory for the torch side."""
    import jax

    from phased_jax.config import model_section
    from phased_jax.hf import to_hf
    from phased_jax.model.attention import resolve_attention_impl
    from phased_jax.train import build_trainer
    from phased_jax.train.metrics import peak_flops_per_device

    device = jax.devices()[0]
    # auto: cuDNN flash attention on a GPU in bfloat16, the reference einsums on CPU
    impl = resolve_attention_impl(spec["attention_impl"] or "auto", device.platform, dtype=spec["dtype"])
    c = get_default_config()
    c.model = model_section("llama2-7b", **model_overrides(spec), attention_impl=impl,
                            dtype=spec["dtype"], param_dtype="float32", remat_policy="none",
                            max_position_embeddings=max(spec["seq"], 4096))
    c.train.update(global_batch=spec["batch"], lr=spec["lr"], warmup_ratio=0.0, schedule="constant")
    c.mesh.shape = (1, 1, 1)
    trainer = build_trainer(c, devices=[device])
    state = trainer.init_state(num_steps=1000)
    to_hf.save(workdir / "init", trainer.model_cfg, state.params, dtype=spec["dtype"], overwrite=True)
    batch = trainer.shard_batch(random_batch(spec["batch"], spec["seq"], spec["vocab_size"]))
    times, losses = [], []
    for _ in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        state, metrics = trainer.step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
    stats = device.memory_stats() or {}
    peak, source = peak_flops_per_device(device, spec["device_peak"])
    return dict(side="jax", device=f"{device.device_kind} ({impl})", times=times, losses=losses,
                mem_bytes=stats.get("peak_bytes_in_use", 0), peak_flops=peak, peak_source=source,
                flops_per_step=trainer.flops_per_step(spec["seq"]))


def run_torch(spec: dict, workdir: Path) -> dict[str, Any]:
    """transformers' LlamaForCausalLM on the JAX side's initial weights, AdamW as ours."""
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    model = transformers.LlamaForCausalLM.from_pretrained(
        workdir / "init", dtype=torch.float32, attn_implementation="sdpa").to(dev).train()
    t = get_default_config().train  # the same AdamW numbers as our optimizer's
    groups = [[p for n, p in model.named_parameters() if ("norm" in n) == no_decay]
              for no_decay in (False, True)]
    opt = torch.optim.AdamW([dict(params=groups[0], weight_decay=t.weight_decay),
                             dict(params=groups[1], weight_decay=0.0)],
                            lr=spec["lr"], betas=(t.b1, t.b2), eps=t.eps, fused=cuda)
    b = random_batch(spec["batch"], spec["seq"], spec["vocab_size"])
    ids = torch.tensor(b["input_ids"], dtype=torch.long, device=dev)
    targets = torch.tensor(b["targets"], dtype=torch.long, device=dev).flatten()
    bf16 = spec["dtype"] == "bfloat16"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times, losses = [], []
    for _ in range(spec["warmup"] + spec["steps"]):
        sync()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    name = torch.cuda.get_device_name() if cuda else "cpu"
    return dict(side="torch", device=f"{name} (sdpa)", times=times, losses=losses,
                mem_bytes=torch.cuda.max_memory_allocated() if cuda else 0)


RUNNERS = {"jax": run_jax, "torch": run_torch}


def run_isolated(side: str, spec: dict, workdir: Path) -> dict[str, Any]:
    """`side` in a child process (each side gets the whole card); raises MemoryError on OOM."""
    cmd = [sys.executable, __file__, "--side", side, "--spec", json.dumps(spec), "--workdir", str(workdir)]
    # JAX takes 75% of the card by default and torch's allocator fragments: give each the card.
    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
           **os.environ}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        if any(m in proc.stderr for m in OOM_MARKERS):
            raise MemoryError(f"{side} ran out of memory at {spec['num_layers']} layers")
        raise RuntimeError(f"{side} side failed (exit {proc.returncode}):\n{tail}")
    return json.loads((workdir / f"{side}.json").read_text())


def table(spec: dict, results: dict[str, dict[str, Any]]) -> list[str]:
    """The benchmark's table: one row per side, then the jax/torch ratios."""
    tokens = spec["batch"] * spec["seq"]
    flops, peak = results["jax"]["flops_per_step"], results["jax"]["peak_flops"]
    rows, tok_s = [], {}
    for side in SIDES:
        r = results[side]
        step = statistics.median(r["times"][spec["warmup"]:])
        tok_s[side] = tokens / step
        mem = f"{r['mem_bytes'] / 2**30:.1f}" if r["mem_bytes"] else "-"
        rows.append((side, r["device"][:34], spec["num_layers"], spec["batch"], spec["seq"],
                     f"{step:.4f}", f"{tok_s[side]:.0f}", f"{flops / step / peak:.1%}", mem,
                     f"{r['losses'][0]:.5f}", f"{r['losses'][-1]:.5f}"))
    ratio = tok_s["jax"] / tok_s["torch"]
    rows.append(("jax/torch", "", "", "", "", "", f"{ratio:.2f}x", "", "", "", ""))
    widths = [max(len(str(x)) for x in col) for col in zip(COLUMNS, *rows, strict=True)]
    fmt = lambda row: "  ".join(f"{str(x):<{w}}" for x, w in zip(row, widths, strict=True))
    return [fmt(COLUMNS)] + [fmt(r) for r in rows] + [
        f"peak {peak / 1e12:.1f} TFLOP/s from {results['jax']['peak_source']}; "
        f"{flops / tokens / 1e9:.2f} GFLOP/token; median of {spec['steps']} steps after "
        f"{spec['warmup']} warm-up; first-loss gap {abs(results['jax']['losses'][0] - results['torch']['losses'][0]):.2e}"]


def build_spec(args: argparse.Namespace) -> dict[str, Any]:
    shape = dict(TINY) if args.tiny else dict(WIDTH_7B, batch=4, seq=2048, num_layers=0)
    for key, value in (("batch", args.batch), ("seq", args.seq), ("num_layers", args.layers)):
        shape[key] = value or shape[key]
    shape["num_layers"] = shape["num_layers"] or fit_layers(shape["batch"], shape["seq"])
    return dict(shape, steps=args.steps, warmup=args.warmup, dtype=args.dtype,
                lr=1e-5, attention_impl=args.attention_impl, device_peak=args.device_peak)


def main(argv: list[str] | None = None) -> int:
    from phased_jax.errors import PhasedError
    try:
        return _main(argv)
    except PhasedError as e:  # bad flags or config: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=0, help="0: as many as fit an 80 GB card")
    ap.add_argument("--batch", type=int, default=0, help="0: 4 (tiny: 2)")
    ap.add_argument("--seq", type=int, default=0, help="0: 2048 (tiny: 32)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--attention-impl", default="", help="'' = auto: cudnn on GPU, xla on CPU")
    ap.add_argument("--device-peak", type=float, default=0.0,
                    help="dense bf16 FLOP/s of one device (0: phased_jax.train.metrics table)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke shape: hidden 64, 2 layers, seq 32")
    ap.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                    help="each side in its own process (auto: unless --tiny)")
    ap.add_argument("--workdir", default="", help="where the initial weights go ('' = a temp dir)")
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:  # a child of run_isolated
        result = RUNNERS[args.side](json.loads(args.spec), Path(args.workdir))
        (Path(args.workdir) / f"{args.side}.json").write_text(json.dumps(result))
        return 0
    for name in ("layers", "batch", "seq", "warmup"):
        if getattr(args, name) < 0:
            ap.error(f"--{name} must be >= 0")
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    spec = build_spec(args)
    isolate = args.isolate == "yes" or (args.isolate == "auto" and not args.tiny)
    with tempfile.TemporaryDirectory(dir=args.workdir or None) as tmp:
        workdir = Path(tmp)
        while True:
            print(f"{spec['num_layers']} layers, batch {spec['batch']}, seq {spec['seq']}, {spec['dtype']}")
            try:
                results = {side: (run_isolated(side, spec, workdir) if isolate
                                  else RUNNERS[side](spec, workdir)) for side in SIDES}
                break
            except MemoryError as e:
                if args.layers or spec["num_layers"] == 1:
                    print(f"error: {e}")
                    return 1
                print(f"{e}; retrying with fewer")
                spec["num_layers"] = max(1, math.floor(spec["num_layers"] * 3 / 4))
            except RuntimeError as e:
                print(f"error: {e}")
                return 1
    for line in table(spec, results):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
