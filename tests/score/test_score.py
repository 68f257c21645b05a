"""`phased-jax score` end to end: a tiny random HF Llama, its losses checked against transformers'
PyTorch model on the same directory, resume by chunk, and the output trained by `phased-jax train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from phased_jax.cli import main as cli_main
from tests.generate.conftest import save_tiny_hf
from tests.xla import xla_flags

REPO = Path(__file__).resolve().parents[2]

TEXTS = ["Give three tips for staying healthy.", "What is the capital of France?",
         "Write a haiku about the sea.", "User: Assistant: Input: Response:",
         "Eat a balanced diet and exercise regularly. Paris is the capital."] * 20
ROWS = [
    {"id": "a", "instruction": "Give three tips for staying healthy.", "input": "",
     "output": "Eat a balanced diet and exercise regularly.", "extra": {"kept": [1, 2]}},
    {"id": "b", "instruction": "What is the capital of France?", "input": "",
     "output": "Paris is the capital."},
    {"id": "c", "instruction": "Write a haiku about the sea.", "input": "short",
     "output": "Waves on the sea, the sea on waves. " * 12},  # cut at max_length
    {"id": "d", "instruction": "Translate", "input": "The cat sat on the mat.",
     "output": "Le chat.", "score": 2.5},
    {"id": "e", "instruction": "Give three tips for the sea.", "input": "",
     "output": "Water, rivers, oceans."},
    {"id": "f", "instruction": "Summarize: Paris.", "input": "", "output": "Paris."},
    {"id": "g", "instruction": "What is the capital?", "input": "France", "output": "Paris, France."},
]
MAX_LENGTH = 96
CONFIG = '''
from phased_jax.config import get_default_config, model_section

def get_config():
    c = get_default_config()
    c.output_dir = "{out}"
    c.model = model_section("tiny-llama", vocab_size=300)
    c.model.init_from = "{model}"
    c.model.dtype = "float32"
    c.data.paths = ("{data}",)
    c.data.max_length = {max_length}
    c.mesh.shape = (2, -1, 1)
    return c
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from phased_jax.data.toy_tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("score")
    model = save_tiny_hf("llama", root / "model", vocab_size=300)
    build_tokenizer(TEXTS, 300, model)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    config = root / "score_cfg.py"
    config.write_text(CONFIG.format(out=root / "run", model=model, data=data, max_length=MAX_LENGTH))
    return {"root": root, "model": model, "data": data, "config": config}


def score(setup, method: str, out: Path, *extra: str) -> int:
    return cli_main(["score", "--config", str(setup["config"]), "--method", method,
                     "--output", str(out), "--batch-size", "2", "--length-multiple", "32", *extra])


def torch_losses(model_dir: Path) -> dict[str, tuple[float, float]]:
    """(mean answer loss given the instruction, alone) per id, by transformers in float32."""
    import torch
    import transformers

    from phased_jax.data.records import Record
    from phased_jax.data.tokens import tokenize

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    records = [Record(r["id"], r["instruction"], r["input"], r["output"], None, "x") for r in ROWS]
    examples, _ = tokenize(records, "authors", tok, MAX_LENGTH)

    def mean_loss(ids: list[int], first: int) -> float:  # tokens first.. are the answer
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        return float(-np.mean([logp[t - 1, ids[t]].item() for t in range(first, len(ids))]))

    out = {}
    for i, rid in enumerate(examples.record_ids.tolist()):
        ids, trained = examples.example(i)
        ids, p = ids.tolist(), int(np.argmax(trained))
        out[rid] = (mean_loss(ids, p), mean_loss([tok.bos_token_id, *ids[p:]], 1))
    return out


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ifd_and_loss_equal_transformers(setup):
    expected = torch_losses(setup["model"])
    for method in ("ifd", "loss"):
        out = setup["root"] / f"{method}.jsonl"
        assert score(setup, method, out) == 0
        got = read(out)
        assert [g["id"] for g in got] == [r["id"] for r in ROWS]  # input order, every row
        for g, row in zip(got, ROWS, strict=True):
            given, alone = expected[g["id"]]
            want = given / alone if method == "ifd" else given
            assert g["score_raw"] == pytest.approx(want, rel=1e-4), (method, g["id"])
            assert 1.0 <= g["score"] <= 5.0
            assert g["scorer"]["method"] == method and g["scorer"]["model"] == str(setup["model"])
            kept = {k: v for k, v in row.items() if k != "score"}
            assert {k: g[k] for k in kept} == kept  # the input row whole
        assert got[3]["score_input"] == 2.5
        raw, scores = [g["score_raw"] for g in got], [g["score"] for g in got]
        assert np.argsort(raw, kind="stable").tolist() == np.argsort(scores, kind="stable").tolist()


def test_resume_skips_finished_chunks(setup, caplog):
    out = setup["root"] / "resume.jsonl"
    assert score(setup, "ifd", out, "--chunk-size", "3") == 0
    chunks = sorted(Path(f"{out}.chunks").iterdir())
    assert len(chunks) == 3  # 7 records by 3
    first = out.read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in chunks}
    out.unlink()  # as if killed before the output was written
    chunks[1].unlink()  # and before the second chunk was saved
    caplog.clear()
    with caplog.at_level("INFO"):
        assert score(setup, "ifd", out, "--chunk-size", "3") == 0
    assert "chunks: 2 done before, 3 records computed" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in (chunks[0], chunks[2])} == {
        p: mtimes[p] for p in (chunks[0], chunks[2])}
    assert out.read_text() == first


def _score_process(setup, out: Path, *extra: str, hooks: tuple[str, ...] = ()
                   ) -> subprocess.CompletedProcess:
    """`phased-jax score` (with tests/score/hooked_score.py's faults) in a fresh process."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(8))
    return subprocess.run([sys.executable, "-m", "tests.score.hooked_score", *hooks, "--config",
                           str(setup["config"]), "--method", "ifd", "--output", str(out),
                           "--batch-size", "2", "--length-multiple", "32", "--chunk-size", "3",
                           *extra], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_two_process_pod_writes_the_same_bytes_and_resumes_after_a_kill(setup, tmp_path):
    """2 processes x 4 devices (the same (2, 4, 1) mesh as one process's 8): only process 0
    writes, the same bytes. One worker SIGKILLed as it starts the second chunk: the pod stops
    (the launcher stops the other), the first chunk is on disk, the output is not; the rerun
    computes only the rest and writes the same bytes (every chunk a pod's: the first from the
    killed pod, the rest from the rerun)."""
    one, pod = tmp_path / "one.jsonl", tmp_path / "pod.jsonl"
    assert score(setup, "ifd", one, "--chunk-size", "3") == 0
    killed = _score_process(setup, pod, "--local-pod", "2",
                            hooks=("--kill-chunk", "2", "--kill-process", "1"))
    assert killed.returncode != 0 and not pod.exists(), killed.stdout[-2000:]
    assert len(list(Path(f"{pod}.chunks").iterdir())) == 1
    resumed = _score_process(setup, pod, "--local-pod", "2")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "chunks: 1 done before, 4 records computed" in resumed.stdout
    reports = [line for line in resumed.stdout.splitlines() if "chunk" in line]
    assert reports and all(line.startswith("[process 0]") for line in reports), \
        "process 0 reports for the pod"
    assert pod.read_bytes() == one.read_bytes()
    assert [p.read_bytes() for p in sorted(Path(f"{pod}.chunks").iterdir())] == [
        p.read_bytes() for p in sorted(Path(f"{one}.chunks").iterdir())]


def test_prompt_filling_max_length_is_reported_and_output_trains(setup, tmp_path):
    from phased_jax.config import get_default_config

    rows = [*ROWS, {"id": "long", "instruction": "What is the capital of France? " * 30,
                    "input": "", "output": "Paris."}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scored.jsonl"
    assert score(setup, "ifd", out, f"--config.data.paths=('{data}',)") == 3
    assert [f["id"] for f in read(Path(f"{out}.failed.jsonl"))] == ["long"]
    assert len(read(out)) == len(ROWS)
    # The default thresholds (1.5, 3.5) and order 1,2,3 give three non-empty phases.
    train_cfg = tmp_path / "train_cfg.py"
    train_cfg.write_text(CONFIG.format(out=tmp_path / "run", model="", data=out,
                                       max_length=MAX_LENGTH).replace(
        "    return c", f"""    c.data.tokenizer = "{setup['model']}"
    c.train.global_batch = 8
    c.train.max_steps_per_phase = 1
    c.train.log_every = 1
    c.checkpoint.async_save = False
    c.export.at_end = False
    return c"""))
    assert get_default_config().data.thresholds == (1.5, 3.5)
    assert cli_main(["stats", "--config", str(train_cfg)]) == 0
    assert cli_main(["train", "--config", str(train_cfg)]) == 0
    assert len([p for p in (tmp_path / "run" / "phases").iterdir() if p.is_dir()]) == 3


CONVERSATIONS = [
    {"id": "x", "messages": [
        {"role": "user", "content": "Give three tips for staying healthy."},
        {"role": "assistant", "content": "Eat a balanced diet."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital."}]},
    {"id": "y", "messages": [
        {"role": "user", "content": "Write a haiku about the sea."},
        {"role": "assistant", "content": "Waves on the sea."}]},
    {"id": "z", "messages": [
        {"role": "user", "content": "Summarize: Paris."}, {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Translate"}, {"role": "assistant", "content": "Le chat."},
        {"role": "user", "content": "Give three tips."},
        {"role": "assistant", "content": "Water, rivers, oceans."}]},
]


def test_conversations_ifd_is_over_every_assistant_token(setup, tmp_path):
    """Given: the mean loss over every assistant turn's tokens (transformers' mask from the
    template with its generations marked). Alone: each assistant turn after a BOS of its own."""
    import torch
    import transformers

    from phased_jax.data.toy_tokenizer import CHAT_TEMPLATE

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CONVERSATIONS))
    config = tmp_path / "chat_cfg.py"
    config.write_text(CONFIG.format(out=tmp_path / "run", model=setup["model"], data=data,
                                    max_length=MAX_LENGTH).replace(
        "    return c", '    c.data.template = "chat"\n    return c'))
    out = tmp_path / "ifd.jsonl"
    assert cli_main(["score", "--config", str(config), "--method", "ifd", "--output", str(out),
                     "--batch-size", "2", "--length-multiple", "32"]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(setup["model"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(setup["model"],
                                                           dtype=torch.float32).eval()
    marked = CHAT_TEMPLATE.replace("Assistant: {{ m['content'] }}{{ eos_token }}",
                                   "Assistant: {% generation %}{{ m['content'] }}{{ eos_token }}"
                                   "{% endgeneration %}")

    def token_losses(ids: list[int]) -> np.ndarray:  # loss of token t given the ones before it
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
        return np.array([0.0] + [-logp[t - 1, ids[t]].item() for t in range(1, len(ids))])

    for row, got in zip(CONVERSATIONS, read(out), strict=True):
        enc = tok.apply_chat_template(row["messages"], chat_template=marked, tokenize=True,
                                      return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = enc["input_ids"], np.asarray(enc["assistant_masks"], bool)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
        runs = list(zip(edges[::2], edges[1::2], strict=True))
        assert len(runs) == len(row["messages"]) // 2  # each turn its own run of tokens
        if len(ids) > MAX_LENGTH:  # z: its last turn does not fit, and is dropped whole
            runs = [(a, b) for a, b in runs if b <= MAX_LENGTH]
            ids, mask = ids[:runs[-1][1]], mask[:runs[-1][1]]
            assert row["id"] == "z" and len(runs) == 2
        given = token_losses(ids)[mask].mean()
        answers = [ids[a:b] for a, b in runs]
        alone = np.concatenate([token_losses([tok.bos_token_id, *a])[1:] for a in answers])
        assert got["score_raw"] == pytest.approx(given / alone.mean(), rel=1e-4), row["id"]
        assert got["messages"] == row["messages"]  # the input row whole
