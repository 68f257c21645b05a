"""The README's walk-through (section 0), run as a user types it.

The config file and the commands are read from README.md (the blocks after `<!-- journey: ...
-->`), so a README change that the code does not follow fails here. Each command runs in a
shell from an empty directory, with ONE CPU device (no forced device count: the suite's 8 fake
devices once hid a crash in `generate`), the project's executables on PATH, a fake
OpenAI-compatible server on 127.0.0.1 in place of GPT-4, and the Hugging Face Hub pointed at a
closed port, so a step that reached for the Hub would fail rather than pass by luck. What the
user brings is made here: Alpaca-format instructions and questions, and a tokenizer directory.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tools.fake_openai import FakeOpenAI
from tests.xla import FAST_COMPILE

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOPICS = ["the sea", "a city at night", "staying healthy", "the moon", "a red bicycle",
          "learning to cook", "rain in spring", "an old library"]


def journey_blocks() -> dict[str, str]:
    """name -> the fenced block after `<!-- journey: name -->` in README.md."""
    text = (REPO / "README.md").read_text()
    return {m.group(1): m.group(2) for m in
            re.finditer(r"<!-- journey: (\S+) -->\n```\w*\n(.*?)```", text, re.S)}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _user_files(root: Path) -> None:
    """What a user brings: instructions, test questions and their model's tokenizer."""
    from phased_jax.data.toy_tokenizer import build_tokenizer

    items = [{"instruction": f"Write {n} sentences about {t}.", "input": "" if i % 3 else t,
              "output": f"Here are {n} sentences about {t}. " * n}
             for i, (t, n) in enumerate((t, n) for t in TOPICS for n in range(1, 7))]
    (root / "alpaca_data.json").write_text(json.dumps(items))
    questions = [{"instruction": f"Tell me about {t}.", "input": ""} for t in TOPICS[:5]]
    (root / "questions.json").write_text(json.dumps(questions))
    build_tokenizer([json.dumps(x) for x in items] * 4, 320, root / "checkpoints" / "Llama-2-7b-hf")


@pytest.fixture(scope="module")
def journey(tmp_path_factory):
    """Every README command run in order: (directory, [(command, seconds, output)])."""
    blocks = journey_blocks()
    assert {"my_experiment.py", "commands"} <= set(blocks), "README lost its journey blocks"
    root = tmp_path_factory.mktemp("journey")
    _user_files(root)
    (root / "my_experiment.py").write_text(blocks["my_experiment.py"])
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "OPENAI_API_KEY", "HF_HUB_OFFLINE",
                        "HF_DATASETS_OFFLINE", "PYTHONPATH")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", HOME=str(root / "home"),
               HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}",
               XLA_FLAGS=FAST_COMPILE)  # one device still: only the compile level is the suite's
    done = []
    with FakeOpenAI() as server:
        env["OPENAI_BASE_URL"] = server.base_url
        for line in blocks["commands"].strip().splitlines():
            t0 = time.perf_counter()
            proc = subprocess.run(line, shell=True, cwd=root, env=env, capture_output=True,
                                  text=True, timeout=300)
            output = proc.stdout + proc.stderr
            assert proc.returncode == 0, f"`{line}` exited {proc.returncode}:\n{output[-3000:]}"
            assert "Traceback" not in output, f"`{line}`:\n{output[-3000:]}"
            assert "PyTorch was not found" not in output
            done.append((line, time.perf_counter() - t0, output))
    for line, seconds, _ in done:
        print(f"{seconds:6.1f}s  {line}")
    return root, done


def _output(done, prefix: str) -> str:
    return next(out for line, _, out in done if line.startswith(prefix))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_score_and_stats(journey):
    root, done = journey
    scored = _jsonl(root / "scored.jsonl")
    assert len(scored) == len(TOPICS) * 6 and all(1 <= r["score"] <= 5 for r in scored)
    assert not (root / "scored.jsonl.failed.jsonl").exists()
    stats = _output(done, "phased-jax stats")
    sizes = [sum(1 for r in scored if lo <= r["score"] < hi) for lo, hi in ((1, 1.5), (1.5, 3.5), (3.5, 6))]
    assert all(sizes), sizes  # the fake server's scores fill every phase
    for k, size in enumerate(sizes, 1):
        assert re.search(rf"^{k}\s+{k}\s+{size}\s", stats, re.M), stats  # phase k holds stage k


def test_random_model_and_conversions(journey):
    root, done = journey
    hf_dir = root / "checkpoints" / "tiny-random-hf"
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["vocab_size"] == 320  # the tokenizer's
    assert (hf_dir / "tokenizer.json").is_file()
    orbax = root / "checkpoints" / "tiny-random"
    assert (orbax / "model_config.json").is_file() and (orbax / "tokenizer" / "tokenizer.json").is_file()
    exported = root / "exported" / "my-tiny-phase1"
    assert (exported / "config.json").is_file() and (exported / "tokenizer.json").is_file()
    assert "tokenizer from" in _output(done, "phased-jax convert runs/")


def test_plan_and_train(journey):
    root, done = journey
    plan = _output(done, "phased-jax plan")
    assert "devices: 1" in plan and "assumed; give --device" in plan
    train = _output(done, "phased-jax train")
    assert train.count("from its first step") == 3 and "starting at step" not in train
    out = root / "runs" / "my-tiny"
    assert sorted(p.name for p in (out / "phases").iterdir()) == [
        "phase1-stage1", "phase2-stage2", "phase3-stage3"]
    assert (out / "hf" / "config.json").is_file()
    assert all((p / "tokenizer" / "tokenizer.json").is_file() for p in (out / "phases").iterdir())


def test_generate_on_one_device_both_forms(journey):
    root, done = journey
    for name, generator in (("final", "my-tiny"), ("phase1", "my-tiny/phase1-stage1")):
        rows = _jsonl(root / f"{name}.jsonl")
        assert len(rows) == 5 and {r["generator"] for r in rows} == {generator}
        assert [r["instruction"] for r in rows] == [f"Tell me about {t}." for t in TOPICS[:5]]
        assert f"wrote 5 answers by {generator!r} to {name}.jsonl" in _output(
            done, f"phased-jax generate --config my_experiment.py --{'hf' if name == 'final' else 'checkpoint'}")


def test_judge_and_report(journey):
    root, done = journey
    table = (root / "judged" / "winrate.md").read_text()
    assert "final" in table and "phase1" in table
    assert table.strip() in _output(done, "cat judged/winrate.md")
    judgments = _jsonl(root / "judged" / "judgments.jsonl")
    assert len(judgments) == 5 and all(j["outcome"] in ("win", "tie", "lose") for j in judgments)
    assert all(j["system_first"]["replies"] and j["baseline_first"]["replies"] for j in judgments)
