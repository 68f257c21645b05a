"""phased-judge: pairwise GPT-4 judging and WinRate tables, as the Phased IFT paper computes them.

Every question is judged twice (system as Assistant 1, then as Assistant 2) with the authors'
prompt. Items whose judgment cannot be parsed in either order (after --reask, default 0 as in the
paper) are listed separately and left out of the rate; the paper's code counted them.
Writes OUTDIR/winrate.{md,csv,json,png} and OUTDIR/judgments.jsonl (every raw reply), each naming
the judge model, with the judge's position and length biases (bias.py) beside every WinRate.
`--agreement A.jsonl B.jsonl` compares two judges' judgments.jsonl instead (agreement.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from phased_jax.fileio import DEFAULT_MAX_RECORD_BYTES, output_problem, write_jsonl_atomic
from phased_jax.formats import AnswerRow, InputError
from phased_tools.agreement import compare, format_agreement, load_judgments
from phased_tools.batch import get_answers
from phased_tools.batch_files import exchange_batch_file
from phased_tools.bias import bias_by_system
from phased_tools.client_config import add_client_args, api_key_or_exit, config_from_args
from phased_tools.jobs import Job, JobResult, cached_count
from phased_tools.judge_prompt import REASK_TEXT, judge_messages, parse_pair, question
from phased_tools.records import load_answers, positive_bytes
from phased_tools.report import write_all
from phased_tools.summary import format_dry_run, format_summary
from phased_tools.winrate import Tally, combine, judgment_outcome

OUTPUT_FILES = ("judgments.jsonl", "winrate.md", "winrate.csv", "winrate.json", "winrate.png")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="phased-judge",
        description="Judge answer files pairwise with GPT-4 (the Phased IFT prompt, both orders) "
        "and report WinRate per test set and the size-weighted average, with the judge's position "
        "and length biases; or compare two judges' judgments (--agreement).",
        epilog="Answer files: JSONL with {test_set, id, instruction, input, output} per line. "
        "A system may be given as NAME=PATH. Exit status: 0 done, 3 some requests failed "
        "(run again to retry them), 1 fatal error (authentication, unknown model, server "
        "unreachable: nothing is written), 2 bad arguments or input.",
    )
    p.add_argument("--system", action="append", default=[], metavar="[NAME=]A.jsonl",
                   help="a system's answers (repeatable)")
    p.add_argument("--systems", nargs="+", default=[], metavar="[NAME=]A.jsonl",
                   help="several systems at once, each against the baseline")
    p.add_argument("--baseline", metavar="[NAME=]B.jsonl", help="the baseline's answers (required to judge)")
    p.add_argument("-o", "--outdir", type=Path, help="folder for the tables and judgments (required to judge)")
    p.add_argument("--agreement", nargs=2, type=Path, metavar=("A.jsonl", "B.jsonl"),
                   help="judge nothing: compare two judgments.jsonl files item by item (matched by "
                   "test_set, id, system, baseline) and print agreement and Cohen's kappa on win/tie/lose")
    p.add_argument("--max-record-bytes", type=positive_bytes, default=DEFAULT_MAX_RECORD_BYTES,
                   help="refuse an answer line longer than this (default: %(default)s)")
    add_client_args(p, reask_default=0)
    return p


def _named(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if sep and name and not Path(spec).exists():
        return name, Path(path)
    return Path(spec).stem, Path(spec)


def match(baseline: dict[tuple[str, str], AnswerRow], system: dict[tuple[str, str], AnswerRow],
          base_path: Path, sys_path: Path) -> None:
    """Raise InputError naming the first (test_set, id) that is missing on either side or differs."""
    for key, row in system.items():
        if key not in baseline:
            raise InputError(
                f"{row.where}: (test_set, id) = {key} is not in the baseline {base_path}; "
                "both files must answer the same questions"
            )
        b = baseline[key]
        if (row.instruction, row.input) != (b.instruction, b.input):
            raise InputError(
                f"{row.where}: {key} has a different instruction/input than "
                f"{b.where}; the files answer different questions"
            )
    for key, row in baseline.items():
        if key not in system:
            raise InputError(
                f"{sys_path}: (test_set, id) = {key} (baseline {row.where}) has no answer; "
                "both files must answer the same questions"
            )


def main(argv: list[str] | None = None) -> int:
    """Entry point of `phased-judge`."""
    args = build_parser().parse_args(argv)
    if args.agreement:
        return agreement_main(*args.agreement)
    cfg = config_from_args(args)
    specs = args.system + args.systems
    if not specs or args.baseline is None or args.outdir is None:
        print("phased-judge: error: give --baseline, -o and at least one --system or --systems "
              "(or --agreement A.jsonl B.jsonl)", file=sys.stderr)
        return 2
    base_name, base_path = _named(args.baseline)
    try:
        baseline = load_answers(base_path, args.max_record_bytes)
        systems: dict[str, dict[tuple[str, str], AnswerRow]] = {}
        for spec in specs:
            name, path = _named(spec)
            if name in systems or name == base_name:
                raise InputError(f"{path}: system name {name!r} used twice; name it with NAME=PATH")
            rows = load_answers(path, args.max_record_bytes)
            match(baseline, rows, base_path, path)
            systems[name] = rows
    except InputError as e:
        print(f"phased-judge: error: {e}", file=sys.stderr)
        return 2
    test_sets = list(dict.fromkeys(k[0] for k in baseline))
    keys = list(baseline)
    jobs: list[Job] = []
    for rows in systems.values():
        for key in keys:
            b, s = baseline[key], rows[key]
            q = question(b.instruction, b.input)
            jobs.append(Job(judge_messages(q, s.output, b.output), parse_pair, REASK_TEXT))
            jobs.append(Job(judge_messages(q, b.output, s.output), parse_pair, REASK_TEXT))
    if args.dry_run:
        msgs = [j.messages for j in jobs]
        print(format_dry_run(len(keys) * len(systems), msgs, cached_count(cfg, msgs), cfg,
                             f"pairs ({len(systems)} system(s) x {len(keys)} questions, 2 orders each)"))
        return 0
    if (status := exchange_batch_file("phased-judge", jobs, cfg)) is not None:
        return status
    problem = output_problem(args.outdir, folder=True)
    if problem is None and args.outdir.is_dir():
        for name in OUTPUT_FILES:
            if problem := output_problem(args.outdir / name):
                break
    if problem:  # before the first request: a run must never pay for answers it cannot write
        print(f"phased-judge: error: -o: {problem}", file=sys.stderr)
        return 2
    api_key = api_key_or_exit(cfg)
    done = get_answers("phased-judge", "judging", jobs, cfg, api_key)
    if isinstance(done, int):
        return done
    results, stats = done.results, done.stats

    tallies: dict[str, dict[str, Tally]] = {}
    judgments: list[dict[str, Any]] = []
    unparseable: list[dict[str, Any]] = []
    request_failures = 0
    it = iter(results)
    for name in systems:
        per_set = tallies.setdefault(name, {t: Tally() for t in test_sets})
        for key in keys:
            r1, r2 = next(it), next(it)
            outcome, error = None, None
            if r1.ok and r2.ok:
                # Order 1: system is Assistant 1; order 2: system is Assistant 2.
                o1 = judgment_outcome(r1.value[0], r1.value[1])
                o2 = judgment_outcome(r2.value[1], r2.value[0])
                outcome = combine(o1, o2)
            else:
                error = "; ".join(f"order {i}: {r.error}" for i, r in ((1, r1), (2, r2)) if not r.ok)
                request_failures += any(not r.ok and not r.replies for r in (r1, r2))
                unparseable.append({"system": name, "test_set": key[0], "id": key[1], "error": error})
            per_set[key[0]].add(outcome)
            judgments.append({
                "system": name, "baseline": base_name, "test_set": key[0], "id": key[1],
                "outcome": outcome, "error": error, "judge_model": cfg.model,
                "system_chars": len(systems[name][key].output), "baseline_chars": len(baseline[key].output),
                "system_first": _order(r1, system_pos=0), "baseline_first": _order(r2, system_pos=1),
            })
    extra = {"judge": {"model": cfg.model, "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}}
    try:
        write_jsonl_atomic(args.outdir / "judgments.jsonl", judgments)
        paths = write_all(args.outdir, tallies, base_name, test_sets, unparseable, extra,
                          bias_by_system(judgments, test_sets), cfg.model)
    except OSError as e:
        print(f"phased-judge: error: cannot write {e.filename or args.outdir} ({e.strerror}); every "
              "judgment is cached, so fix that and run again: nothing is sent twice", file=sys.stderr)
        return 1
    counts = {"pairs": len(judgments), "judged": len(judgments) - len(unparseable),
              "unparseable": len(unparseable) - request_failures, "failed requests": request_failures}
    print(format_summary(stats, cfg, counts, done.wall), file=sys.stderr)
    print((args.outdir / "winrate.md").read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths + [args.outdir / "judgments.jsonl"]), file=sys.stderr)
    return 3 if request_failures else 0


def agreement_main(path_a: Path, path_b: Path) -> int:
    """`phased-judge --agreement A B`: print how far two judges agree; 2 on a bad file."""
    try:
        files = load_judgments(path_a), load_judgments(path_b)
    except InputError as e:
        print(f"phased-judge: error: {e}", file=sys.stderr)
        return 2
    result = compare(*files)
    if not result.pairs:
        print(f"phased-judge: error: no item judged in both {path_a} and {path_b}; are they "
              "judgments of the same answers?", file=sys.stderr)
        return 2
    print(format_agreement(result, (path_a, path_b), files), end="")
    return 0


def _order(r: JobResult, system_pos: int) -> dict[str, Any]:
    d: dict[str, Any] = {"replies": r.replies}
    if r.ok:
        d.update(system_score=r.value[system_pos], baseline_score=r.value[1 - system_pos])
    else:
        d["error"] = r.error
    return d


if __name__ == "__main__":
    sys.exit(main())
