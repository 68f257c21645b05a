"""Phased training on conversations (2-4 exchanges, some with a system turn), packed: a run
SIGKILLed in the middle of phase 2 and rerun ends bitwise equal to the uninterrupted run; the
stats table shows turns and answer tokens per phase."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from phased_jax.data.stats import main as stats_main
from tests.once import once
from tests.runner.runs import phase_events, phase_params, step_lines, train, write_config

pytestmark = pytest.mark.slow
CHAT = """
c.data.template = "chat"
c.data.packing = True
c.data.max_length = 160
"""
STAGES = (1.5, 3.5)  # the paper's thresholds (the default data.thresholds)


def conversations(records: list[dict]) -> list[dict]:
    """The tiny experiment's records grouped, within a difficulty stage, into conversations of
    2, 3 and 4 exchanges in turn (the first exchange's score), every third with a system turn;
    half in the messages shape, half in ShareGPT's, written to two files."""
    def stage(score: float) -> int:
        return sum(score >= t for t in STAGES)

    out = []
    for k in range(3):
        rows = [r for r in records if stage(float(r["score"])) == k]
        i, size = 0, 2
        while i < len(rows):
            group, i = rows[i:i + size], i + size
            turns = ([{"role": "system", "content": "Answer briefly."}] if len(out) % 3 == 0
                     else [])
            for r in group:
                turns += [{"role": "user", "content": f"{r['instruction']}\n{r['input']}".strip()},
                          {"role": "assistant", "content": r["output"]}]
            out.append({"id": f"c{len(out)}", "score": group[0]["score"], "messages": turns})
            size = 2 + (size - 1) % 3
    return out


def sharegpt(row: dict) -> dict:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"id": row["id"], "score": row["score"],
            "conversations": [{"from": names[t["role"]], "value": t["content"]}
                              for t in row["messages"]]}


@pytest.fixture(scope="module")
def chat_experiment(tiny_experiment, tmp_path_factory) -> dict:
    def build(root: Path) -> dict:
        records = [json.loads(x) for x in Path(tiny_experiment["data"]).read_text().splitlines()]
        rows = conversations(records)
        data = root / "data"
        data.mkdir()
        (data / "a_messages.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows[::2]))
        (data / "b_sharegpt.json").write_text(json.dumps([sharegpt(r) for r in rows[1::2]]))
        return {**tiny_experiment, "data": str(data), "root": str(root),
                "conversations": len(rows)}

    return once(tmp_path_factory, "chat_experiment", build)


def test_stats_show_turns_and_answer_tokens(chat_experiment, tmp_path, capsys):
    cfg = write_config(chat_experiment, tmp_path / "run", extra=CHAT)
    assert stats_main(["--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"read {chat_experiment['conversations']} records, all valid" in out
    assert "mean turns" in out and "answer tokens" in out
    rows = [line.split() for line in out.splitlines() if line[:2] in ("1 ", "2 ", "3 ")]
    turns = [float(r[-2]) for r in rows]
    assert len(turns) == 6 and all(4 <= t <= 8 for t in turns)  # 2-4 exchanges, the system turn not counted


def test_sigkill_mid_phase_2_then_rerun_is_bitwise_the_uninterrupted_run(chat_experiment,
                                                                          tmp_path):
    ref = tmp_path / "ref"
    train(write_config(chat_experiment, ref, extra=CHAT))
    ends = [e["step"] for e in phase_events(ref, "phase_end")]
    assert len(ends) == 3 and ends[1] - ends[0] >= 3, ends
    report = json.loads((ref / "data_report.json").read_text())
    assert report["invalid"]["read"] == chat_experiment["conversations"]
    assert report["tokens"]["skipped"] == 0
    out = tmp_path / "run"
    cfg = write_config(chat_experiment, out, extra=CHAT)
    kill_at = ends[0] + 1 + (ends[1] - ends[0]) // 2  # mid-phase 2, off the checkpoint steps
    killed = train(cfg, kill_after=kill_at, check=False)
    assert killed.returncode == -9
    train(cfg)
    assert step_lines(out) == list(range(1, ends[-1] + 1))
    for name in sorted(p.name for p in (ref / "phases").iterdir()):
        mine, want = phase_params(out / "phases" / name), phase_params(ref / "phases" / name)
        for k in want:
            np.testing.assert_array_equal(mine[k], want[k], err_msg=f"{name} {k}")
