"""Throughput of the data pipeline on this CPU: records -> packed batches, in tokens/s.

Compared with what one TPU v5p host (4 chips) consumes training Llama-2 7B at 50% MFU:
tokens/s per chip = 0.5 * 459e12 / flops_per_token(llama2-7b, 2048). The pipeline only has to
stay ahead of that; the ratio says by how much.

Uses the authors' stage-3 file from ../shared/data when present, else generated records; the
tokenizer is a byte-level BPE built here (its training time is excluded).

Then conversations (`--conversations N`, 0 to skip): N generated 1-4-exchange conversations (a
third with a system turn) tokenised with Meta's Llama-3 chat template on a Llama-3-shaped
tokenizer (tests/data/llama3_tokenizer.py): ours (ids and the mask of every assistant turn)
against transformers' `apply_chat_template` loop on the same data, ids only and with its
assistant mask (the template's twin with `{% generation %}` marks), in records/s (each side
the fastest of 3 runs).

    .venv/bin/python benchmarks/pipeline.py [--max_length 2048] [--global_batch 128] [--repeat 1]
        [--conversations 2000]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from phased_jax.data.loader import PhaseLoader
from phased_jax.data.phases import build_phases
from phased_jax.data.records import Record, read_records
from phased_jax.data.tokens import tokenize, tokenize_cached
from phased_jax.data.toy_tokenizer import build_tokenizer
from phased_jax.formats import Turn, as_messages
from phased_jax.model import get_preset
from phased_jax.model.flops import flops_per_token

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.data.chat_templates import LLAMA3_MARKED  # noqa: E402  (the tests' templates)
from tests.data.llama3_tokenizer import build_llama3_tokenizer  # noqa: E402

STAGE3 = Path(__file__).resolve().parents[1].parent / "shared/data/alpaca-scored/en-alpaca52k-stage3.jsonl"
V5P_PEAK = 459e12  # bf16 FLOP/s per chip
CHIPS_PER_HOST = 4
MFU = 0.5


def generated(n: int, path: Path) -> Path:
    rng = random.Random(0)
    words = ("the a water city rain explain write list describe compare story data model "
             "river ocean summary reason step first second because").split()
    with open(path, "w") as f:
        for i in range(n):
            text = lambda k: " ".join(rng.choices(words, k=k))  # noqa: E731
            row = {"id": str(i), "score": str(rng.choice([1, 2, 3.5, 4.25, 5])),
                   "data": [text(rng.randint(5, 30)) + "\n" + text(rng.randint(0, 40)),
                            text(rng.randint(20, 300))]}
            f.write(__import__("json").dumps(row) + "\n")
    return path


def conversations(n: int) -> list[Record]:
    rng = random.Random(1)
    words = ("the a water city rain explain write list describe compare story data model "
             "river ocean summary reason step first second because").split()
    text = lambda k: " ".join(rng.choices(words, k=k))  # noqa: E731
    out = []
    for i in range(n):
        turns = [Turn("system", text(rng.randint(5, 15)))] if i % 3 == 0 else []
        for _ in range(rng.randint(1, 4)):
            turns += [Turn("user", text(rng.randint(5, 40))),
                      Turn("assistant", text(rng.randint(10, 150)))]
        out.append(Record(str(i), turns[-2].content, "", turns[-1].content, 2.0, f"gen:{i}",
                          tuple(turns)))
    return out


def conversation_table(n: int, max_length: int) -> None:
    """Records/s of conversations: ours (ids + loss mask) vs transformers' loop."""
    tok = build_llama3_tokenizer(Path(tempfile.mkdtemp(prefix="pipeline-chat-")) / "tok")
    recs = conversations(n)
    chats = [as_messages(r.messages) for r in recs]
    def best(fn):  # the fastest of 3: what each side can do, less the machine's noise
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return min(times), out

    ours, (examples, rep) = best(lambda: tokenize(recs, "chat", tok, max_length))
    hf_ids, ids = best(lambda: [tok.apply_chat_template(m, tokenize=True, return_dict=True)
                                ["input_ids"] for m in chats])
    hf_mask, _ = best(lambda: [tok.apply_chat_template(
        m, chat_template=LLAMA3_MARKED, tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True) for m in chats])
    whole = [i for i in range(n) if len(ids[i]) <= max_length]  # examples untouched by max_length
    index = {r: i for i, r in enumerate(examples.record_ids.tolist())}
    same = sum(examples.example(index[recs[i].id])[0].tolist() == ids[i] for i in whole)
    turns = sum(len(r.messages) for r in recs)
    print(f"\nconversations: {n:,} generated ({turns / n:.1f} turns each), Meta's Llama-3 chat "
          f"template, Llama-3-shaped tokenizer (vocab {len(tok)}); {rep.truncated} truncated, "
          f"{len(rep.skipped)} skipped at max_length {max_length}; ids equal to transformers' in "
          f"{same} of the {len(whole)} that fit whole")
    print(f"{'tokenise conversations':<44} {'seconds':>9} {'records/s':>11} {'ours, speed':>12}")
    print(f"{'phased-jax (ids + mask of every answer)':<44} {ours:>9.3f} {n / ours:>11,.0f} "
          f"{'1.00x':>12}")
    for name, sec in (("transformers apply_chat_template (ids)", hf_ids),
                      ("transformers (ids + assistant mask)", hf_mask)):
        print(f"{name:<44} {sec:>9.3f} {n / sec:>11,.0f} {sec / ours:>11.2f}x")


def v5p_host_tokens_per_s(seq_len: int) -> tuple[float, float]:
    fpt = flops_per_token(get_preset("llama2-7b"), seq_len)
    return fpt, CHIPS_PER_HOST * MFU * V5P_PEAK / fpt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max_length", type=int, default=2048)
    ap.add_argument("--global_batch", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=1, help="read the data this many times")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--conversations", type=int, default=2000,
                    help="conversations for the chat-template table (0: skip it)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    path = STAGE3 if STAGE3.exists() else generated(7000, tmp / "generated.jsonl")
    source = "authors' stage-3 file" if path == STAGE3 else "generated records"
    texts = [r.instruction + "\n" + r.input + "\n" + r.output
             for r in read_records(str(path), on_invalid="skip")[0]]
    tok = build_tokenizer(texts, args.vocab, tmp / "tok")  # not timed

    t = {}
    t0 = time.perf_counter()
    recs: list[Record] = []
    for k in range(args.repeat):
        rs, _ = read_records(str(path), on_invalid="skip")
        recs += [Record(f"{r.id}-{k}", r.instruction, r.input, r.output, r.score, r.source)
                 for r in rs]
    t["read + validate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    phases = build_phases(recs, "oneoff")
    t["phases"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    examples, rep = tokenize(recs, "authors", tok, args.max_length)
    t["tokenise (template, mask)"] = time.perf_counter() - t0
    examples = examples.select([r.id for r in phases[0].records])

    t0 = time.perf_counter()
    loader = PhaseLoader(examples, args.global_batch, epochs=1, seed=0, phase_index=0, packing=True)
    t["pack (plan rows)"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    real = 0
    for s in range(loader.steps):
        real += int((loader.batch(s)["segment_ids"] > 0).sum())
    t["build batches"] = time.perf_counter() - t0

    _, _, cache = tokenize_cached(recs, "authors", tok, args.max_length, tmp / "cache")
    t0 = time.perf_counter()
    tokenize_cached(recs, "authors", tok, args.max_length, tmp / "cache")
    t_cache = time.perf_counter() - t0

    total = sum(t.values())
    fpt, need = v5p_host_tokens_per_s(args.max_length)
    rows = loader.rows_per_epoch(0)
    fill = real / (rows * args.max_length)
    print(f"data: {source}, {len(recs):,} records x1 epoch, {real:,} tokens in {rows} packed rows "
          f"of {args.max_length} ({fill:.1%} full), {loader.steps} batches of {args.global_batch}; "
          f"tokenizer: byte-level BPE, vocab {len(tok)}; {rep.truncated} truncated")
    print(f"\n{'stage':<28} {'seconds':>9} {'tokens/s':>14}")
    for name, sec in t.items():
        print(f"{name:<28} {sec:>9.3f} {real / sec:>14,.0f}")
    print(f"{'records -> packed batches':<28} {total:>9.3f} {real / total:>14,.0f}")
    print(f"{'(cached: load token cache)':<28} {t_cache:>9.3f} {real / t_cache:>14,.0f}")
    print(f"\nTPU v5p host, Llama-2 7B at {MFU:.0%} MFU: flops/token {fpt:.3e} (seq {args.max_length})"
          f" -> {need / CHIPS_PER_HOST:,.0f} tokens/s per chip, {need:,.0f} per host of "
          f"{CHIPS_PER_HOST} chips")
    print(f"pipeline / host consumption: {real / total / need:.1f}x cold (incl. tokenising); "
          f"batch building alone {real / t['build batches'] / need:.1f}x "
          f"(what a cached restart pays per step)")
    print(f"one batch: {t['build batches'] / max(loader.steps, 1) * 1e3:.1f} ms to build, vs "
          f"{args.global_batch * args.max_length * fill / need * 1e3:.0f} ms for the host to "
          f"consume it")
    assert np.isfinite(total)
    if args.conversations:
        conversation_table(args.conversations, args.max_length)


if __name__ == "__main__":
    main()
