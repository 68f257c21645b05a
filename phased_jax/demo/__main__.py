"""`make demo`: Phased IFT end to end on CPU, from a pretrained base, over several seeds.

Stages: build the graded-task data, the prose corpus and a tokenizer -> pretrain a base model
on the corpus and export it to HF (once: reused while its inputs are unchanged) -> on each
seed, instruction-tune every arm from that base: phased (3 phases, a boundary checkpoint after
each), one-off, reverse (3,2,1), and the follow-up variants phased-replay and
phased-one-schedule -> export each to HF -> generate answers on the held-out split (and from
every multi-phase model at each phase boundary) -> exact match by difficulty band (mean +- sd
over seeds), the paper's win/tie/lose table, a two-level (seeds, then items) bootstrap of each
pre-registered accuracy difference and its verdict -> report.md and PNG plots. The design
criteria are in `phased_jax.demo.config`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from phased_jax.local_paths import quiet_transformers_notice  # noqa: E402

quiet_transformers_notice()  # before anything imports transformers

from phased_jax import hf, preemption  # noqa: E402
from phased_jax.data.tokens import load_tokenizer  # noqa: E402
from phased_jax.data.toy_tokenizer import build_tokenizer  # noqa: E402
from phased_jax.demo.base import build_base  # noqa: E402
from phased_jax.demo.config import (  # noqa: E402
    ARMS,
    BYTE_VOCAB,
    CORPUS_DOCS,
    DATA_SIZES,
    SEEDS,
    TOKENIZER_VOCAB,
    demo_config,
    pretrain_config,
)
from phased_jax.demo.corpus import build_corpus, prose_phrases  # noqa: E402
from phased_jax.demo.report import write_report  # noqa: E402
from phased_jax.demo.tasks import build_dataset, prompt_phrases, texts_for_tokenizer  # noqa: E402
from phased_jax.fileio import read_jsonl, write_jsonl_atomic, write_text_atomic  # noqa: E402
from phased_jax.formats import AnswerRow  # noqa: E402
from phased_jax.generate.decode import generate  # noqa: E402
from phased_jax.model import Transformer  # noqa: E402
from phased_jax.params_checkpoint import load_params  # noqa: E402
from phased_jax.train.runner import run  # noqa: E402

MAX_NEW_TOKENS = 12  # answers are at most 8 characters and EOS
QUICK = {"sizes": {"n_train": 240, "n_test": 24}, "corpus_docs": 320, "epochs": 1, "seeds": (0, 1)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m phased_jax.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--quick", action="store_true",
                   help="a shortened run (same code path: fewer examples, epochs and seeds) "
                        "for tests")
    p.add_argument("--fresh", action="store_true",
                   help="delete --out first (the cached base model too)")
    return p.parse_args(argv)


class Stages:
    """Times each stage and prints it as it goes."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t0 = time.time()

    def run(self, name: str, fn, *args, **kwargs):
        print(f"\n== {name} (at {self.total:.0f}s) ==", flush=True)
        t = time.time()
        result = fn(*args, **kwargs)
        self.seconds[name] = time.time() - t
        print(f"== {name}: {self.seconds[name]:.1f}s ==", flush=True)
        return result

    @property
    def total(self) -> float:
        return time.time() - self._t0


def build_data(out: Path, sizes: dict[str, int], corpus_docs: int) -> dict:
    """The graded data, the prose corpus (no test word in it) and a character tokenizer plus
    one token per fixed prompt or prose phrase."""
    info = build_dataset(out / "data", **sizes, seed=0)
    test_words = {r["input"] for r in read_jsonl(info["test"])}
    corpus = build_corpus(out / "data" / "corpus.jsonl", corpus_docs, test_words, seed=0)
    texts = (texts_for_tokenizer(read_jsonl(info["train"]))
             + [r["output"] for r in read_jsonl(corpus["path"])])
    tok = build_tokenizer(texts, BYTE_VOCAB, out / "tokenizer")
    tok.add_tokens(prompt_phrases() + prose_phrases())
    tok.save_pretrained(str(out / "tokenizer"))
    assert len(tok) == TOKENIZER_VOCAB, (len(tok), TOKENIZER_VOCAB)  # the configs' model
    print(f"train {info['train_phase_counts']} per phase, test {info['test_phase_counts']}; "
          f"corpus of {corpus['n_docs']} documents ({corpus['n_words']} words); "
          f"tokenizer of {len(tok)} tokens in {out / 'tokenizer'}")
    return {**info, "corpus": corpus}


def answer(model_dir: Path, tokenizer_dir: Path, test_path: Path, answers_path: Path,
           max_new_tokens: int) -> None:
    """Greedy answers of an HF export or a phase checkpoint, in the format `phased-judge` reads."""
    if (model_dir / "config.json").is_file():
        model, params = hf.load(model_dir, dtype="float32")
    else:  # a phase-boundary checkpoint (Orbax params + model_config.json)
        cfg, params = load_params(model_dir)
        model = Transformer(cfg)
    tokenizer = load_tokenizer(str(tokenizer_dir))
    items = read_jsonl(test_path)
    outputs = generate(model, params, tokenizer,
                       [{"instruction": r["instruction"], "input": r["input"]} for r in items],
                       template="authors", max_new_tokens=max_new_tokens, max_length=48,
                       batch_size=100)
    write_jsonl_atomic(answers_path, [
        AnswerRow(r.get("test_set", "demo"), r["id"], r["instruction"], r["input"], o).to_row()
        for r, o in zip(items, outputs, strict=True)])


def answer_seed(out: Path, seed: int, runs: dict[str, dict], test_path: Path
                ) -> dict[str, dict[str, Path]]:
    """Answers of every arm of one seed, and of every multi-phase arm at its inner phase
    boundaries, for the forgetting plot. Returns arm -> "after phase k" -> answers (multi-phase
    arms only; the last phase's are the final model's, not generated twice)."""
    phase_answers: dict[str, dict[str, Path]] = {}
    for arm, r in runs.items():
        answer(Path(r["hf_dir"]), out / "tokenizer", test_path, Path(r["answers"]),
               MAX_NEW_TOKENS)
        dirs = sorted(p for p in (Path(r["output_dir"]) / "phases").glob("phase*") if p.is_dir())
        if len(dirs) < 2:
            continue
        phase_answers[arm] = {}
        for k, d in enumerate(dirs, 1):
            path = (Path(r["answers"]) if k == len(dirs)
                    else out / f"seed{seed}" / f"answers_{arm}_after_phase{k}.jsonl")
            if k < len(dirs):
                answer(d, out / "tokenizer", test_path, path, MAX_NEW_TOKENS)
            phase_answers[arm][f"after phase {k}"] = path
    return phase_answers


def seed_dir_for(out: Path, seed: int, base_key: str) -> Path:
    """`<out>/seed<seed>`, emptied first if its runs were tuned from another base (they would
    otherwise resume as done), and stamped with this base's key."""
    d = out / f"seed{seed}"
    stamp = d / "base_key.txt"
    if d.exists() and (not stamp.is_file() or stamp.read_text().strip() != base_key):
        print(f"seed {seed}: its runs were tuned from another base model; running them again")
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    if not stamp.is_file():
        write_text_atomic(stamp, base_key + "\n")
    return d


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except preemption.Preempted as e:  # SIGTERM during a training stage: its checkpoint is saved
        print(f"{e} (the demo resumes each stage where it stopped)", flush=True)
        return preemption.PREEMPTED_EXIT


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    import jax

    # Every run compiles the same steps: the later ones read them from this cache.
    jax.config.update("jax_compilation_cache_dir", str((out / "jax_cache").absolute()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

    sizes, corpus_docs, epochs, seeds = dict(DATA_SIZES), CORPUS_DOCS, None, SEEDS
    if args.quick:
        sizes, corpus_docs = QUICK["sizes"], QUICK["corpus_docs"]
        epochs, seeds = QUICK["epochs"], QUICK["seeds"]
    stages = Stages()
    info = stages.run("build data, corpus and tokenizer", build_data, out, sizes, corpus_docs)

    pre = pretrain_config(str(out))
    base = stages.run("pretrain base model", build_base, pre, out / "base")

    runs: dict[int, dict[str, dict]] = {}
    for seed in seeds:
        runs[seed] = {}
        seed_dir_for(out, seed, base["key"])
        for name in ARMS:
            cfg = demo_config(str(out), arm=name, seed=seed)
            if epochs:
                cfg.train.epochs_per_phase = epochs
            summary = stages.run(f"train {name} seed {seed}", run, cfg)
            runs[seed][name] = {
                "metrics_jsonl": str(Path(cfg.output_dir) / "logs" / "metrics.jsonl"),
                "phase_boundaries": summary["phase_end_steps"][:-1],
                "hf_dir": summary["hf_dir"], "output_dir": cfg.output_dir,
                "answers": str(out / f"seed{seed}" / f"answers_{name}.jsonl")}

    test_path = Path(info["test"])
    phase_answers: dict[str, dict[int, dict[str, Path]]] = {}
    for seed in seeds:
        got = stages.run(f"generate seed {seed}", answer_seed, out, seed, runs[seed], test_path)
        for arm, by_label in got.items():
            phase_answers.setdefault(arm, {})[seed] = by_label
    timings = dict(stages.seconds)
    report, results = stages.run(
        "report", write_report, out, runs=runs, test_path=test_path, timings=timings,
        train_path=info["train"], phase_answers=phase_answers, base=base,
        extra={"base model": base["dir"], "base reused": base["reused"],
               "seeds": ", ".join(map(str, seeds)), "total_seconds": stages.total})
    print_summary(out, runs, results, stages, report)
    return 0


def print_summary(out: Path, runs: dict, results: dict, stages: Stages, report: Path) -> None:
    print("\n== timings ==")
    for stage, s in stages.seconds.items():
        print(f"  {stage:<34} {s:6.1f}s")
    print(f"  {'total':<34} {stages.total:6.1f}s")
    seed0 = next(iter(runs))
    phased = Path(runs[seed0]["phased"]["output_dir"])
    print(f"\nreport:       {report}\nplots:        {out}/*.png")
    print(f"base model:   {out}/base (HF format; reused by later runs while its inputs hold)")
    print(f"checkpoints:  {phased}/checkpoints (phase ends kept), {phased}/phases/*")
    print(f"HF exports:   {out}/seed*/<arm>/hf")
    print("continue from a phase checkpoint, e.g. train phase 3 again from phase 2's weights:\n"
          "  phased-jax train --config configs/demo.py --config.data.order=3 "
          f"--config.model.init_from={phased}/phases/phase2-stage2 "
          f"--config.output_dir={out}/from_phase2")
    print("\n" + results["summary_text"])


if __name__ == "__main__":
    sys.exit(main())
