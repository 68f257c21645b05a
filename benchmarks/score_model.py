"""`phased-jax score --method ifd` throughput: our sharded forward passes vs transformers', same CPU.

    .venv/bin/python benchmarks/score_model.py [--examples 256] [--batch 16]

A random Llama (d_model 256, 4 layers, vocab 8000, float32) is saved by transformers and loaded
by `phased_jax.hf.load`, so both sides run identical weights on the same examples (random
prompts of 16-64 tokens, answers of 16-96). Each side computes every example's IFD: two
forward passes (the answer given its prompt, and `BOS + answer`), batches of `--batch` rows in
length order. Ours is `phased_jax.score.losses.mean_losses` (length buckets of 64, one compile
per bucket, reported separately); theirs is `LlamaForCausalLM` on right-padded rows with an
attention mask and the same masked mean loss. The sides' timed runs alternate (`--repeats`)
and their medians are compared. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from types import SimpleNamespace

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import jax
    import numpy as np
    import torch
    import transformers

    from phased_jax.config import get_default_config
    from phased_jax.data.tokens import TokenizedExamples
    from phased_jax.hf import load
    from phased_jax.score.losses import answers_alone, make_forward, mean_losses
    from phased_jax.sharding import Placement, place_params

    cfg = transformers.LlamaConfig(
        vocab_size=8000, hidden_size=args.d_model, intermediate_size=int(args.d_model * 2.6875),
        num_hidden_layers=args.layers, num_attention_heads=args.d_model // 64,
        num_key_value_heads=args.d_model // 64, max_position_embeddings=512,
        initializer_range=0.05, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(cfg).eval()
    tmp = tempfile.mkdtemp()
    hf_model.save_pretrained(tmp)
    model, params = load(tmp, dtype="float32")
    placement = Placement.from_config(get_default_config().mesh)
    params = place_params(model.cfg, params, placement)
    forward = make_forward(model, placement)

    rng = np.random.default_rng(0)
    prompts = [np.concatenate([[1], rng.integers(3, 8000, rng.integers(15, 64))])
               for _ in range(args.examples)]
    answers = [rng.integers(3, 8000, rng.integers(16, 97)) for _ in range(args.examples)]
    seqs = [np.concatenate([p, a]).astype(np.int32) for p, a in zip(prompts, answers, strict=True)]
    lengths = np.array([len(s) for s in seqs])
    examples = TokenizedExamples(
        np.concatenate(seqs), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        np.array([len(p) for p in prompts], np.int32), np.array([str(i) for i in range(len(seqs))]),
        max_length=256, pad_id=0)
    alone = answers_alone(examples, SimpleNamespace(bos_token_id=1))  # a tokenizer's BOS
    print(f"model: llama d_model {args.d_model}, {args.layers} layers, vocab 8000, float32; "
          f"{args.examples} examples, batch {args.batch}")
    print(f"cpu: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; torch "
          f"threads {torch.get_num_threads()}; jax {jax.__version__}, torch {torch.__version__}")

    def ours() -> np.ndarray:
        given = mean_losses(forward, params, examples, placement, args.batch, 64)
        return given / mean_losses(forward, params, alone, placement, args.batch, 64)

    def theirs_mean(ex: TokenizedExamples) -> np.ndarray:
        out = np.zeros(len(ex))
        order = np.argsort(ex.lengths, kind="stable")
        for start in range(0, len(order), args.batch):
            idx = order[start:start + args.batch]
            L = int(ex.lengths[idx].max())
            ids = torch.zeros((len(idx), L), dtype=torch.long)
            mask = torch.zeros((len(idx), L), dtype=torch.long)
            labels = torch.full((len(idx), L), -100, dtype=torch.long)
            for r, i in enumerate(idx):
                x, trained = ex.example(int(i))
                p = int(np.argmax(trained))  # one answer: its first trained token
                ids[r, :len(x)] = torch.from_numpy(x.astype(np.int64))
                mask[r, :len(x)] = 1
                labels[r, p:len(x)] = ids[r, p:len(x)]
            with torch.no_grad():
                logp = torch.log_softmax(hf_model(ids, attention_mask=mask).logits[:, :-1].float(), -1)
            tgt = labels[:, 1:]
            nll = -logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * (tgt >= 0)
            out[idx] = (nll.sum(-1) / (tgt >= 0).sum(-1)).numpy()
        return out

    def theirs() -> np.ndarray:
        return theirs_mean(examples) / theirs_mean(alone)

    t0 = time.perf_counter()
    ifd_ours = ours()  # warm-up: compiles every length bucket
    first_s = time.perf_counter() - t0
    ifd_theirs = theirs()
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    for _ in range(args.repeats):
        for name, run in (("ours", ours), ("theirs", theirs)):
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    ours_s, theirs_s = statistics.median(times["ours"]), statistics.median(times["theirs"])
    rel = float(np.max(np.abs(ifd_ours - ifd_theirs) / np.abs(ifd_theirs)))
    n = args.examples
    print("\n| side | examples/s (IFD, 2 forwards each) | median s | runs s |")
    print("|---|---|---|---|")
    print(f"| phased-jax score | {n / ours_s:.1f} | {ours_s:.2f} | "
          f"{'/'.join(f'{t:.2f}' for t in times['ours'])} |")
    print(f"| transformers (PyTorch) | {n / theirs_s:.1f} | {theirs_s:.2f} | "
          f"{'/'.join(f'{t:.2f}' for t in times['theirs'])} |")
    print(f"\nratio ours/transformers: {theirs_s / ours_s:.2f}x; our first run (with compiles) "
          f"{first_s:.1f}s; max relative IFD difference {rel:.1e}")
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
