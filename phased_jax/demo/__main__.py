"""`make demo`: Phased IFT end to end on CPU, in minutes, on data it builds itself.

Stages: build the graded-task data and a tokenizer -> train phased (3 phases, a boundary
checkpoint after each) and one-off on the same examples and epochs -> export both to HF ->
generate answers on the held-out split (also from the phased model at each phase boundary) ->
exact-match accuracy by difficulty and the paper's win/tie/lose table from an offline judge ->
report.md and PNG plots.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from phased_jax import hf  # noqa: E402
from phased_jax.data.tokens import load_tokenizer  # noqa: E402
from phased_jax.data.toy_tokenizer import build_tokenizer  # noqa: E402
from phased_jax.demo.config import (  # noqa: E402
    BYTE_VOCAB,
    DATA_SIZES,
    TOKENIZER_VOCAB,
    demo_config,
)
from phased_jax.demo.judge import accuracy, pairwise  # noqa: E402
from phased_jax.demo.report import write_report  # noqa: E402
from phased_jax.demo.tasks import build_dataset, prompt_phrases, texts_for_tokenizer  # noqa: E402
from phased_jax.fileio import read_jsonl, write_jsonl_atomic  # noqa: E402
from phased_jax.formats import AnswerRow  # noqa: E402
from phased_jax.generate.decode import generate  # noqa: E402
from phased_jax.model import Transformer  # noqa: E402
from phased_jax.params_checkpoint import load_params  # noqa: E402
from phased_jax.train.runner import run  # noqa: E402

MAX_NEW_TOKENS = 12  # answers are at most 8 characters and EOS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m phased_jax.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--quick", action="store_true",
                   help="a shortened run (same code path, fewer examples and epochs) for tests")
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    return p.parse_args(argv)


class Stages:
    """Times each stage and prints it as it goes."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t0 = time.time()

    def run(self, name: str, fn, *args, **kwargs):
        print(f"\n== {name} ==", flush=True)
        t = time.time()
        result = fn(*args, **kwargs)
        self.seconds[name] = time.time() - t
        print(f"== {name}: {self.seconds[name]:.1f}s ==", flush=True)
        return result

    @property
    def total(self) -> float:
        return time.time() - self._t0


def build_data(out: Path, sizes: dict[str, int]) -> dict:
    """The graded data and a character tokenizer plus one token per fixed prompt phrase."""
    info = build_dataset(out / "data", **sizes, seed=0)
    tok = build_tokenizer(texts_for_tokenizer(read_jsonl(info["train"])), BYTE_VOCAB,
                          out / "tokenizer")
    tok.add_tokens(prompt_phrases())
    tok.save_pretrained(str(out / "tokenizer"))
    assert len(tok) == TOKENIZER_VOCAB, (len(tok), TOKENIZER_VOCAB)  # configs/demo.py's model
    print(f"train {info['train_phase_counts']} per phase, test {info['test_phase_counts']}; "
          f"tokenizer of {len(tok)} tokens in {out / 'tokenizer'}")
    return info


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


def answer_phases(phases_dir: Path, tokenizer_dir: Path, test_path: Path, out: Path,
                  final_answers: Path) -> dict[str, Path]:
    """Answers of the phased model at each phase boundary (the last is the final model's)."""
    dirs = sorted(p for p in phases_dir.iterdir() if p.is_dir())
    answers = {}
    for k, d in enumerate(dirs, 1):
        path = final_answers if k == len(dirs) else out / f"answers_phased_after_phase{k}.jsonl"
        if k < len(dirs):
            answer(d, tokenizer_dir, test_path, path, MAX_NEW_TOKENS)
        answers[f"after phase {k}"] = path
    return answers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.fresh and out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    import jax

    # Both runs compile the same step: the second one reads it from this cache.
    jax.config.update("jax_compilation_cache_dir", str((out / "jax_cache").absolute()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


    sizes = dict(DATA_SIZES)
    epochs = None
    if args.quick:
        sizes, epochs = {"n_train": 240, "n_test": 24}, 1
    stages = Stages()
    info = stages.run("build data and tokenizer", build_data, out, sizes)

    runs: dict[str, dict] = {}
    for name, order in (("phased", "1,2,3"), ("oneoff", "oneoff")):
        cfg = demo_config(str(out), order=order)
        if epochs:
            cfg.train.epochs_per_phase = epochs
        summary = stages.run(f"train {name}", run, cfg)
        runs[name] = {"metrics_jsonl": str(Path(cfg.output_dir) / "logs" / "metrics.jsonl"),
                      "phase_boundaries": summary["phase_end_steps"][:-1],
                      "hf_dir": summary["hf_dir"], "output_dir": cfg.output_dir}

    test_path = Path(info["test"])
    for name, r in runs.items():
        r["answers"] = str(out / f"answers_{name}.jsonl")
        stages.run(f"generate {name}", answer, Path(r["hf_dir"]), out / "tokenizer", test_path,
                   Path(r["answers"]), MAX_NEW_TOKENS)
    phase_answers = stages.run("generate phased after each phase", answer_phases,
                               Path(runs["phased"]["output_dir"]) / "phases", out / "tokenizer",
                               test_path, out, Path(runs["phased"]["answers"]))

    acc = {name: accuracy(r["answers"], test_path) for name, r in runs.items()}
    acc_phases = {k: accuracy(p, test_path) for k, p in phase_answers.items()}
    cmp = pairwise(runs["phased"]["answers"], runs["oneoff"]["answers"], test_path)
    timings = dict(stages.seconds)
    report = write_report(out, runs=runs, test_path=test_path, timings=timings,
                          train_path=info["train"], phase_answers=phase_answers,
                          extra={"accuracy": acc, "winrate": cmp, "total_seconds": stages.total})
    print_summary(out, runs, acc, acc_phases, cmp, stages, report)
    return 0


def print_summary(out: Path, runs: dict, acc: dict, acc_phases: dict, cmp: dict, stages: Stages,
                  report: Path) -> None:
    print("\n== results: exact-match accuracy on the held-out split ==")
    bands = list(next(iter(acc.values()))["by_band"])
    print(f"  {'':<22}" + "".join(f"{b:>10}" for b in bands) + f"{'all':>10}")
    rows = {**acc, **{f"phased {k}": a for k, a in acc_phases.items()}}
    for name, a in rows.items():
        cells = [a["by_band"][b]["accuracy"] for b in bands] + [a["all"]["accuracy"]]
        print(f"  {name:<22}" + "".join(f"{x:>10.1%}" for x in cells))
    print("phased vs one-off, offline judge (win / tie / lose, WinRate points):")
    for band, c in cmp["by_set"].items():
        print(f"  {band:<8} {c['win']:>4} / {c['tie']:>4} / {c['lose']:>4}   "
              f"{c['winrate']:+.2f}")
    print("\n== timings ==")
    for stage, s in stages.seconds.items():
        print(f"  {stage:<34} {s:6.1f}s")
    print(f"  {'total':<34} {stages.total:6.1f}s")
    phased = Path(runs["phased"]["output_dir"])
    print(f"\nreport:       {report}\nplots:        {out}/*.png")
    print(f"checkpoints:  {phased}/checkpoints (phase ends kept), {phased}/phases/*")
    print(f"HF exports:   {runs['phased']['hf_dir']}, {runs['oneoff']['hf_dir']}")
    print("continue from a phase checkpoint, e.g. train phase 3 again from phase 2's weights:\n"
          "  phased-jax train --config configs/demo.py --config.data.order=3 "
          f"--config.model.init_from={phased}/phases/phase2-stage2 "
          f"--config.output_dir={out}/from_phase2")


if __name__ == "__main__":
    sys.exit(main())
