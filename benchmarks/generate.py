"""Decode throughput: our KV-cache `while_loop` vs transformers' `generate`, same CPU, same weights.

    .venv/bin/python benchmarks/generate.py [--batches 1,8] [--new-tokens 128] [--prompt 32]

A random Llama (d_model 512, 8 layers, vocab 32000, float32) is saved by transformers and loaded
by `phased_jax.hf.load`, so both sides run identical weights. Greedy, no EOS stop, so every row
makes exactly `--new-tokens` tokens. Each side is warmed up once with the same shapes; our
compile time is reported separately and excluded from tokens/s. The sides' timed runs alternate
(`--repeats`) and their medians are compared, so a busy spell on a shared CPU does not land on one
side only. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs of each side, interleaved; the medians are compared")
    ap.add_argument("--threads", type=int, default=0,
                    help="1: run both sides single-threaded (steadier on a shared CPU)")
    args = ap.parse_args()
    if args.threads == 1:  # before JAX starts: XLA's CPU thread pool is fixed at startup
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false"
                                   " intra_op_parallelism_threads=1")

    import jax
    import numpy as np
    import torch
    import transformers

    from phased_jax.generate.decode import generate_ids
    from phased_jax.hf import load

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=args.d_model, intermediate_size=int(args.d_model * 2.6875),
        num_hidden_layers=args.layers, num_attention_heads=args.d_model // 64,
        num_key_value_heads=args.d_model // 64, max_position_embeddings=1024,
        initializer_range=0.05, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(cfg).eval()
    tmp = tempfile.mkdtemp()
    hf_model.save_pretrained(tmp)
    model, params = load(tmp, dtype="float32")
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(f"model: llama d_model {args.d_model}, {args.layers} layers, vocab 32000, "
          f"{n_params / 1e6:.1f}M params, float32; prompt {args.prompt}, {args.new_tokens} new tokens")
    print(f"cpu: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; "
          f"torch threads {torch.get_num_threads()}; jax {jax.__version__}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    compile_events: dict[str, float] = {}  # JAX's own trace/lower/compile timings

    def on_event(name: str, seconds: float, **_: object) -> None:
        if name.startswith("/jax/core/compile/"):
            compile_events[name] = compile_events.get(name, 0.0) + seconds

    jax.monitoring.register_event_duration_secs_listener(on_event)

    def timed(run) -> float:
        t0 = time.perf_counter()
        run()
        return time.perf_counter() - t0

    def fmt(times: list[float]) -> str:
        return "/".join(f"{t:.2f}" for t in times)

    rng = np.random.default_rng(0)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = rng.integers(3, 32000, (batch, args.prompt))
        T = args.new_tokens

        run_ours = functools.partial(
            generate_ids, model, params, prompts.tolist(), eos_token_ids=[], max_new_tokens=T,
            max_length=args.prompt + T, batch_size=batch, length_multiple=args.prompt)
        ids = torch.tensor(prompts)
        run_theirs = functools.partial(
            hf_model.generate, ids, attention_mask=torch.ones_like(ids), max_new_tokens=T,
            min_new_tokens=T, do_sample=False, pad_token_id=0)

        compile_events.clear()
        out = run_ours()  # warm-up: trace, lower and compile, then one run
        compile_s = sum(compile_events.values())
        with torch.no_grad():
            ref = run_theirs()  # warm-up
        ours, theirs = [], []
        for _ in range(args.repeats):  # interleaved, so a busy spell on a shared CPU hits both
            ours.append(timed(run_ours))
            with torch.no_grad():
                theirs.append(timed(run_theirs))
        ours_s, hf_s = statistics.median(ours), statistics.median(theirs)
        print(f"batch {batch}: ours {fmt(ours)} s (+{compile_s:.1f}s compile), "
              f"transformers {fmt(theirs)} s", flush=True)
        same = ref[:, args.prompt:].tolist() == out
        rows.append((batch, batch * T / ours_s, batch * T / hf_s, compile_s, same))
    print("\n| batch | ours tok/s | transformers tok/s | ratio | our compile s | same tokens |")
    print("|---|---|---|---|---|---|")
    for batch, ours_tps, hf_tps, compile_s, same in rows:
        print(f"| {batch} | {ours_tps:.1f} | {hf_tps:.1f} | {ours_tps / hf_tps:.2f}x | "
              f"{compile_s:.1f} | {same} |")
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
