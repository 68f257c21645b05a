"""CPU tokens/s of a LoRA train step against the full step, ours and peft + torch's, one run.

    .venv/bin/python benchmarks/lora_speed.py [--hidden 512 --layers 8 --seq 256 --batch 4]
        [--rank 16 --alpha 32 --targets q,k,v,o,gate,up,down] [--repeats 3] [--quick]

Four sides on the same shapes and batch, float32 (XLA:CPU runs bf16 dots in f32, so bf16 is no
fair race), each a forward + backward + clip + AdamW step:
  jax full        our `Trainer` fine-tuning every weight;
  jax LoRA        the same `Trainer` with `lora=LoraSpec(...)`: adapters trained, base frozen;
  torch full      transformers' LlamaForCausalLM, torch AdamW over every parameter;
  torch+peft LoRA the same model wrapped by peft's `get_peft_model(LoraConfig(...))`, AdamW over
                  the adapters only.
Timed interleaved (one step of each side per repeat, so background load hits all alike), the
median of `--repeats` after `--warmup` untimed steps (compile, allocation). JAX runs on one CPU
device and torch on as many threads as this process may use. Ratios are of tokens/s: LoRA/full
within a framework, jax/torch within a mode. Not part of `make test`.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import functools  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from phased_jax.config import get_default_config, model_config, model_section  # noqa: E402
from phased_jax.data.tokens import random_batch  # noqa: E402
from phased_jax.model.lora import MODULES, LoraSpec, parse_targets  # noqa: E402
from phased_jax.model.lora import split as lora_split  # noqa: E402
from phased_jax.train.trainer import Trainer  # noqa: E402

print = functools.partial(print, flush=True)  # progress shows under load

DEFAULT = dict(hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1408, vocab=32000,
               seq=256, batch=4)
QUICK = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=176, vocab=256, seq=32,
             batch=2)
SIDES = ("jax full", "jax LoRA", "torch full", "torch+peft LoRA")
COLUMNS = ("side", "tokens/s", "step ms", "trainable params", "LoRA/full", "jax/torch")


def cpu_model() -> str:
    """/proc/cpuinfo's first "model name" (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class JaxSide:
    """Our Trainer's jitted step, full fine-tuning or (with `spec`) LoRA on a frozen base."""

    def __init__(self, shape: dict, spec: LoraSpec | None, lr: float, attention_impl: str) -> None:
        c = get_default_config()
        # head_dim given: the preset's own (64 // 4) would stay, not follow hidden / heads
        c.model = model_section(
            "tiny-llama", vocab_size=shape["vocab"], num_layers=shape["layers"],
            hidden_size=shape["hidden"], num_heads=shape["heads"], num_kv_heads=shape["kv_heads"],
            head_dim=shape["hidden"] // shape["heads"], intermediate_size=shape["intermediate"],
            max_position_embeddings=shape["seq"], attention_impl=attention_impl,
            dtype="float32", param_dtype="float32")
        c.train.update(global_batch=shape["batch"], lr=lr, warmup_ratio=0.0, schedule="constant")
        c.mesh.shape = (1, 1, 1)
        self.trainer = Trainer(model_config(c.model), c.train, c.mesh, seed=0,
                               devices=jax.devices()[:1], lora=spec)
        if spec is not None:  # a random base, frozen (its init's adapters are dropped)
            params = jax.jit(self.trainer.model.init)(jax.random.key(0),
                                                      jnp.zeros((1, 8), jnp.int32))["params"]
            self.trainer.set_base(lora_split(nn.meta.unbox(params))[0])
        self.state = self.trainer.init_state(num_steps=1000)
        self.batch = self.trainer.shard_batch(random_batch(shape["batch"], shape["seq"],
                                                           shape["vocab"]))
        self.trainable = sum(x.size for x in jax.tree.leaves(self.state.params))

    def step(self) -> float:
        t0 = time.perf_counter()
        self.state, metrics = self.trainer.step(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - t0


class TorchSide:
    """transformers' LlamaForCausalLM, full fine-tuning or (with `spec`) wrapped by peft."""

    def __init__(self, shape: dict, spec: LoraSpec | None, lr: float) -> None:
        import torch
        import transformers
        torch.set_num_threads(cores())
        torch.manual_seed(0)
        hc = transformers.LlamaConfig(
            vocab_size=shape["vocab"], hidden_size=shape["hidden"],
            intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
            num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
            max_position_embeddings=shape["seq"], torch_dtype="float32")
        self.torch = torch
        self.model = transformers.LlamaForCausalLM(hc).float()
        if spec is not None:
            import peft
            lc = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                                 target_modules=[MODULES[t].split(".")[1] for t in spec.targets],
                                 bias="none", task_type="CAUSAL_LM")
            with warnings.catch_warnings():  # transformers' deprecation note, peft's call
                warnings.simplefilter("ignore", FutureWarning)
                self.model = peft.get_peft_model(self.model, lc)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in self.params)
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
        b = random_batch(shape["batch"], shape["seq"], shape["vocab"])
        self.ids = torch.tensor(b["input_ids"], dtype=torch.long)

    def step(self) -> float:
        t0 = time.perf_counter()
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


def table(tokens: int, medians: dict[str, float], trainable: dict[str, int]) -> str:
    """The markdown table: one row per side, ratios of tokens/s against its same-run peer."""
    tok_s = {s: tokens / medians[s] for s in SIDES}
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(
        [":---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    for s in SIDES:
        fw, mode = s.split()[0].split("+")[0], s.split()[-1]
        full = f"{fw} full"
        lora_full = f"{tok_s[s] / tok_s[full]:.2f}x" if mode == "LoRA" else "-"
        jax_torch = (f"{tok_s[s] / tok_s[next(p for p in SIDES if p.startswith('torch') and p.endswith(mode))]:.2f}x"
                     if fw == "jax" else "-")
        lines.append(f"| {s} | {tok_s[s]:.0f} | {medians[s] * 1e3:.1f} | {trainable[s]:,} | "
                     f"{lora_full} | {jax_torch} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for k, v in DEFAULT.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None,
                        help=f"default {v} ({QUICK[k]} with --quick)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--targets", default="q,k,v,o,gate,up,down",
                    help="short names or a regex over module names, as model.lora.targets")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per side (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    ap.add_argument("--attention-impl", default="dot_product_attention",
                    choices=("xla", "dot_product_attention"))
    ap.add_argument("--quick", action="store_true", help="a tiny model, 2 repeats: a smoke test")
    args = ap.parse_args(argv)
    shape = {k: getattr(args, k) if getattr(args, k) is not None else (QUICK if args.quick else DEFAULT)[k]
             for k in DEFAULT}
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 3)
    spec = LoraSpec(args.rank, args.alpha, parse_targets(args.targets))
    import peft
    import torch
    import transformers
    print(f"# LoRA step vs full step, CPU: {cpu_model()} ({cores()} cores usable, "
          f"torch threads {cores()}, jax devices {jax.devices()[:1]})")
    print(f"# jax {jax.__version__}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, peft {peft.__version__}; float32; load avg "
          f"{os.getloadavg()[0]:.2f}")
    print(f"# model: vocab {shape['vocab']}, hidden {shape['hidden']}, layers {shape['layers']}, "
          f"heads {shape['heads']}/{shape['kv_heads']} kv, mlp {shape['intermediate']}; batch "
          f"{shape['batch']} x seq {shape['seq']}; LoRA r={spec.rank} alpha={spec.alpha:g} on "
          f"{','.join(spec.targets)}; median of {repeats} after {args.warmup} warm-up")
    t0 = time.perf_counter()
    sides = {"jax full": JaxSide(shape, None, args.lr, args.attention_impl),
             "jax LoRA": JaxSide(shape, spec, args.lr, args.attention_impl),
             "torch full": TorchSide(shape, None, args.lr),
             "torch+peft LoRA": TorchSide(shape, spec, args.lr)}
    for mode in ("full", "LoRA"):  # the same model and adapters on both sides, or no race
        mine, theirs = (next(s for s in SIDES if s.startswith(fw) and s.endswith(mode))
                        for fw in ("jax", "torch"))
        if sides[mine].trainable != sides[theirs].trainable:
            raise SystemExit(f"{mine} trains {sides[mine].trainable:,} params but {theirs} "
                             f"{sides[theirs].trainable:,}: the shapes differ")
    for s in SIDES:
        for _ in range(args.warmup):
            print(f"warm-up {s}: {sides[s].step():.2f}s")
    times: dict[str, list[float]] = {s: [] for s in SIDES}
    for r in range(repeats):
        for s in SIDES:
            times[s].append(sides[s].step())
        print(f"repeat {r}: " + ", ".join(f"{s} {times[s][-1]:.2f}s" for s in SIDES))
    medians = {s: statistics.median(times[s]) for s in SIDES}
    print(f"# wall {time.perf_counter() - t0:.0f}s; load avg after {os.getloadavg()[0]:.2f}")
    print()
    print(table(shape["batch"] * shape["seq"], medians, {s: sides[s].trainable for s in SIDES}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
