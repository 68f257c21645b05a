"""Our jitted train step vs transformers' PyTorch LlamaForCausalLM training step, on this CPU.

    .venv/bin/python benchmarks/train_step.py [--configs S,M] [--repeats 5] [--profile DIR]

Both sides: float32 (XLA:CPU runs bf16 dots in f32, so bf16 is no fair race), forward +
backward + clip + AdamW on the same shapes, timed interleaved (jax S, torch S, jax M, torch M,
...) so background load hits both alike; median of `--repeats` after one warm-up step.
MFU counts the model's matmul FLOPs (`flops_per_token`) against the f32 matmul rate one
`jnp.dot` reaches here in the same run. Not part of `make test`.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import functools  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

from phased_jax.config import get_default_config, model_section  # noqa: E402
from phased_jax.data.tokens import random_batch  # noqa: E402
from phased_jax.model.flops import flops_per_token  # noqa: E402
from phased_jax.train import build_trainer  # noqa: E402
from phased_jax.train.metrics import probe_matmul_flops  # noqa: E402

print = functools.partial(print, flush=True)  # progress shows under load

SHAPES = {
    "S": dict(hidden_size=512, num_heads=8, num_kv_heads=4, intermediate_size=1408, batch=4),
    "M": dict(hidden_size=1024, num_heads=16, num_kv_heads=8, intermediate_size=2816, batch=2),
}
COMMON = dict(vocab_size=32000, num_layers=8, seq=512)


class JaxSide:
    def __init__(self, shape: dict, attention_impl: str) -> None:
        c = get_default_config()
        c.model = model_section(
            "tiny-llama", vocab_size=COMMON["vocab_size"], num_layers=COMMON["num_layers"],
            hidden_size=shape["hidden_size"], num_heads=shape["num_heads"],
            num_kv_heads=shape["num_kv_heads"], intermediate_size=shape["intermediate_size"],
            # the preset's head_dim (16) would stay, not follow hidden / heads as torch's does
            head_dim=shape["hidden_size"] // shape["num_heads"],
            max_position_embeddings=COMMON["seq"], attention_impl=attention_impl,
            dtype="float32", param_dtype="float32")
        c.data.max_length = COMMON["seq"]
        c.train.update(global_batch=shape["batch"], lr=1e-4, warmup_ratio=0.0, schedule="constant")
        c.mesh.shape = (1, 1, 1)
        self.trainer = build_trainer(c, devices=jax.devices()[:1])
        self.state = self.trainer.init_state(num_steps=1000)
        self.batch = self.trainer.shard_batch(random_batch(shape["batch"], COMMON["seq"],
                                                         COMMON["vocab_size"]))
        self.model_cfg = self.trainer.model_cfg

    def step(self) -> float:
        t0 = time.perf_counter()
        self.state, metrics = self.trainer.step(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - t0


class TorchSide:
    def __init__(self, shape: dict) -> None:
        import torch
        import transformers
        torch.set_num_threads(os.cpu_count() or 1)
        torch.manual_seed(0)
        hc = transformers.LlamaConfig(
            vocab_size=COMMON["vocab_size"], hidden_size=shape["hidden_size"],
            intermediate_size=shape["intermediate_size"], num_hidden_layers=COMMON["num_layers"],
            num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
            max_position_embeddings=COMMON["seq"], torch_dtype="float32")
        self.torch = torch
        self.model = transformers.LlamaForCausalLM(hc).float().train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                     weight_decay=0.1)
        b = random_batch(shape["batch"], COMMON["seq"], COMMON["vocab_size"])
        self.ids = torch.tensor(b["input_ids"], dtype=torch.long)

    def step(self) -> float:
        t0 = time.perf_counter()
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


def summarize_trace(trace_dir: Path, top: int = 15) -> None:
    """Sum XLA op durations in the Perfetto trace jax.profiler wrote: where the step's time goes."""
    files = sorted(trace_dir.rglob("*.trace.json.gz"))
    if not files:
        print(f"(no trace found under {trace_dir})")
        return
    events = json.load(gzip.open(files[-1]))
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        name = e.get("name", "?")
        if name.startswith(("$", "ThunkExecutor", "SlinkyThreadPool", "PjitFunction")):
            continue  # wrappers and waits, not XLA ops
        if e.get("ph") == "X" and "dur" in e:
            totals[e.get("name", "?")] += e["dur"]
    grand = sum(totals.values())
    print(f"profile ({files[-1]}): top ops by total time")
    for name, dur in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {dur / 1e3:10.1f} ms  {100 * dur / max(grand, 1):5.1f}%  {name[:90]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="S,M")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--attention-impl", default="dot_product_attention",
                    choices=("xla", "dot_product_attention"))
    ap.add_argument("--profile", default="", help="write a jax.profiler trace of 2 steps per config here")
    args = ap.parse_args(argv)
    names = args.configs.split(",")
    print(f"devices: {jax.devices()} cpu_count={os.cpu_count()} load avg={os.getloadavg()}")
    sides = {n: (JaxSide(SHAPES[n], args.attention_impl), TorchSide(SHAPES[n])) for n in names}
    times: dict[str, dict[str, list[float]]] = {n: {"jax": [], "torch": []} for n in names}
    for n in names:  # warm-up: compile, allocate
        sides[n][0].step()
        sides[n][1].step()
    peaks = [probe_matmul_flops(n=2048, repeats=5)]
    for r in range(args.repeats):
        for n in names:
            times[n]["jax"].append(sides[n][0].step())
            times[n]["torch"].append(sides[n][1].step())
            print(f"repeat {r} {n}: jax {times[n]['jax'][-1]:.2f}s torch {times[n]['torch'][-1]:.2f}s")
    peaks.append(probe_matmul_flops(n=2048, repeats=5))
    peak = max(peaks)
    print(f"f32 jnp.dot peak here: {peak / 1e9:.1f} GFLOP/s (max of two probes: "
          f"{', '.join(f'{p / 1e9:.1f}' for p in peaks)}); load avg after: {os.getloadavg()}")
    print(f"{'config':<7}{'jax tok/s':>11}{'torch tok/s':>13}{'ratio':>8}{'jax MFU':>9}"
          f"{'torch MFU':>11}   step times (s) jax | torch")
    for n in names:
        tokens = SHAPES[n]["batch"] * COMMON["seq"]
        flops = flops_per_token(sides[n][0].model_cfg, COMMON["seq"]) * tokens
        tj, tt = statistics.median(times[n]["jax"]), statistics.median(times[n]["torch"])
        print(f"{n:<7}{tokens / tj:>11.0f}{tokens / tt:>13.0f}{tt / tj:>7.2f}x"
              f"{flops / tj / peak:>9.1%}{flops / tt / peak:>11.1%}   "
              f"{' '.join(f'{t:.2f}' for t in times[n]['jax'])} | "
              f"{' '.join(f'{t:.2f}' for t in times[n]['torch'])}")
    if args.profile:
        out = Path(args.profile)
        for n in names:
            with jax.profiler.trace(str(out / n), create_perfetto_trace=True):
                for _ in range(2):
                    sides[n][0].step()
            print(f"--- config {n}")
            summarize_trace(out / n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
