"""An offline judge in the paper's shape, for the demo's tasks that have one right answer.

The paper asks GPT-4 to score two systems' answers 1-10, twice with the order swapped, and
turns the two verdicts into win/tie/lose per item and a WinRate per test set (DESIGN.md
section 1). The demo has no GPT-4, but its tasks have reference answers, so a scorer stands in
for the judge: 10 for a correct answer, else 1 + 8 * (difflib similarity to the reference),
rounded, so a near miss ("NADUK" for "NADUKA") beats a wild one. The rest — both orders, the
win/tie/lose rule, WinRate in points, one "test set" per difficulty band plus all items — is
the paper's, and the rule and WinRate are `phased_tools.winrate`'s, the same code that scores
GPT-4's verdicts. The scorer sees no positions, so its two orders always agree; the rule still
runs on both, as it would on GPT-4's verdicts.

Normalisation before comparing (deliberately mild): leading/trailing whitespace stripped, runs
of whitespace collapsed to one space, trailing . ! ? , ; : removed. Case is *kept*: upper-
casing is one of the tasks, so folding case would mark "naduk" right for "NADUK".
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from phased_tools.winrate import Outcome, combine, judgment_outcome, tally

from phased_jax.demo.tasks import THRESHOLDS, phase_of
from phased_jax.fileio import iter_jsonl

BANDS = ("phase1", "phase2", "phase3")
BAND_LABELS = {
    "phase1": f"phase 1 [1, {THRESHOLDS[0]})",
    "phase2": f"phase 2 [{THRESHOLDS[0]}, {THRESHOLDS[1]})",
    "phase3": f"phase 3 [{THRESHOLDS[1]}, 5]",
    "all": "all",
}
OUTCOMES: tuple[Outcome, ...] = ("win", "tie", "lose")


class JudgeError(ValueError):
    """Answer and reference files that cannot be matched; the message names file and ids."""


def normalize(text: str) -> str:
    """The mild normalisation above: whitespace and trailing punctuation, never case."""
    return re.sub(r"[.!?,;:]+$", "", re.sub(r"\s+", " ", text.strip())).rstrip()


def is_correct(answer: str, reference: str) -> bool:
    return normalize(answer) == normalize(reference)


def band_of(score: float) -> str:
    return f"phase{phase_of(score)}"


def task_of(record: Mapping[str, Any]) -> str:
    """A record's task family: its `task` field, else the family part of a demo id."""
    if record.get("task"):
        return str(record["task"])
    parts = str(record.get("id", "")).split("-")
    return parts[1] if len(parts) == 3 else "unknown"


# --- reading and matching ---------------------------------------------------------------

def read_by_id(path: str | Path) -> dict[str, dict[str, Any]]:
    """JSONL objects keyed by `id`; malformed lines, missing or repeated ids are errors."""
    out: dict[str, dict[str, Any]] = {}
    for lineno, obj in iter_jsonl(path, JudgeError):
        if "id" not in obj:
            raise JudgeError(f"{path}:{lineno}: expected a JSON object with an 'id' field")
        key = str(obj["id"])
        if key in out:
            raise JudgeError(f"{path}:{lineno}: id {key!r} appears twice")
        out[key] = obj
    return out


def _ids(ids: Iterable[str], limit: int = 5) -> str:
    ids = sorted(ids)
    return ", ".join(ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def match_answers(answers_path: str | Path, references: Mapping[str, Mapping[str, Any]],
                  test_path: str | Path = "references") -> dict[str, dict[str, Any]]:
    """One answer per reference id, or a JudgeError naming the ids missing or unknown."""
    answers = read_by_id(answers_path)
    missing = references.keys() - answers.keys()
    extra = answers.keys() - references.keys()
    if missing:
        raise JudgeError(f"{answers_path}: no answer for {len(missing)} id(s) of {test_path}: "
                         f"{_ids(missing)}")
    if extra:
        raise JudgeError(f"{answers_path}: {len(extra)} id(s) not in {test_path}: {_ids(extra)}")
    for key, ref in references.items():
        a = answers[key]
        if "output" not in a:
            raise JudgeError(f"{answers_path}: answer {key!r} has no 'output' field")
        if "instruction" in a and a["instruction"] != ref["instruction"]:
            raise JudgeError(f"{answers_path}: answer {key!r} is for instruction "
                             f"{a['instruction']!r}, the reference has {ref['instruction']!r}")
    return answers


# --- exact-match accuracy ---------------------------------------------------------------

def _acc(correct: int, n: int) -> dict[str, float]:
    return {"n": n, "correct": correct, "accuracy": correct / n if n else float("nan")}


def accuracy(answers_path: str | Path, test_path: str | Path) -> dict[str, dict[str, Any]]:
    """Exact-match accuracy by difficulty band, by task family and overall.

    Returns {"by_band": {"phase1": {"n", "correct", "accuracy"}, ...}, "by_task": {...},
    "all": {...}}.
    """
    refs = read_by_id(test_path)
    answers = match_answers(answers_path, refs, test_path)
    tally: dict[str, dict[str, list[int]]] = {"by_band": {}, "by_task": {}}
    hits = []
    for key, ref in refs.items():
        hit = int(is_correct(str(answers[key]["output"]), str(ref["output"])))
        hits.append(hit)
        tally["by_band"].setdefault(band_of(float(ref["score"])), []).append(hit)
        tally["by_task"].setdefault(task_of(ref), []).append(hit)
    return {
        "by_band": {b: _acc(sum(tally["by_band"].get(b, [])), len(tally["by_band"].get(b, [])))
                    for b in BANDS},
        "by_task": {t: _acc(sum(h), len(h)) for t, h in tally["by_task"].items()},
        "all": _acc(sum(hits), len(hits)),
    }


# --- the pairwise judge and the paper's rule --------------------------------------------

def score_answer(answer: str, reference: str) -> int:
    """1-10 like the GPT-4 judge: 10 if correct, else 1 + 8 * similarity (rounded)."""
    a, r = normalize(answer), normalize(reference)
    if a == r:
        return 10
    return 1 + round(8 * difflib.SequenceMatcher(None, a, r).ratio())


def judge_once(answer_1: str, answer_2: str, reference: str) -> tuple[int, int]:
    """One judgment: scores for Assistant 1 and Assistant 2, in that order."""
    return score_answer(answer_1, reference), score_answer(answer_2, reference)


def _counts(results: list[Outcome]) -> dict[str, float]:
    """win/tie/lose counts, n and WinRate (points; NaN when empty) of item outcomes."""
    t = tally(results)
    rate = t.winrate()
    return {"win": t.win, "tie": t.tie, "lose": t.lose, "n": t.judged,
            "winrate": float("nan") if rate is None else rate}


def pairwise(answers_a: str | Path, answers_b: str | Path, test_path: str | Path
             ) -> dict[str, Any]:
    """System A against system B on every test item, both orders, from A's side.

    Returns {"items": [{"id", "band", "task", "a_first": (score_a, score_b),
    "b_first": (score_b, score_a), "result"}], "by_set": {"phase1" | "phase2" | "phase3" | "all":
    {"win", "tie", "lose", "n", "winrate"}}}. "all" pools the items, which equals the paper's
    size-weighted average of the per-set WinRates.
    """
    refs = read_by_id(test_path)
    a = match_answers(answers_a, refs, test_path)
    b = match_answers(answers_b, refs, test_path)
    items = []
    for key, ref in refs.items():
        out_a, out_b, out_r = str(a[key]["output"]), str(b[key]["output"]), str(ref["output"])
        a_first = judge_once(out_a, out_b, out_r)  # A is Assistant 1
        b_first = judge_once(out_b, out_a, out_r)  # B is Assistant 1
        result = combine(judgment_outcome(a_first[0], a_first[1]),
                         judgment_outcome(b_first[1], b_first[0]))
        items.append({"id": key, "band": band_of(float(ref["score"])), "task": task_of(ref),
                      "a_first": a_first, "b_first": b_first, "result": result})
    by_set = {band: _counts([i["result"] for i in items if i["band"] == band]) for band in BANDS}
    by_set["all"] = _counts([i["result"] for i in items])
    return {"items": items, "by_set": by_set}
