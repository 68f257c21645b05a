"""The README's conversation examples (the blocks after `<!-- conversations: FILE -->`) read as
what they say: the same two conversations in both shapes, trained with a chat template, and
`phased-score --turns all` takes them as the README's walk does."""

import re
from pathlib import Path

import pytest
from phased_tools.score import main as score_main

from phased_jax.data.records import read_records
from phased_jax.data.tokens import tokenize
from tests.data.llama3_tokenizer import build_llama3_tokenizer

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme_chat")
    blocks = re.findall(r"<!-- conversations: (\S+) -->\n```\w*\n(.*?)```", README.read_text(),
                        re.S)
    assert [name for name, _ in blocks] == ["chat.jsonl", "chat_sharegpt.json"]
    for name, body in blocks:
        (root / name).write_text(body)
    return root


def test_both_shapes_hold_the_same_conversations(files, tmp_path):
    messages, _ = read_records(str(files / "chat.jsonl"))
    sharegpt, _ = read_records(str(files / "chat_sharegpt.json"))
    assert [(r.id, r.messages) for r in messages] == [(r.id, r.messages) for r in sharegpt]
    assert [len(r.messages) for r in messages] == [5, 2]
    tok = build_llama3_tokenizer(tmp_path / "tok")
    examples, report = tokenize(messages, "chat", tok, 256)
    assert len(examples) == 2 and report.truncated == 0
    assert tok.decode(examples.ids[examples.trained]) == "7.<|eot_id|>2.<|eot_id|>Bonjour.<|eot_id|>"


def test_phased_score_takes_them(files, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    for name in ("chat.jsonl", "chat_sharegpt.json"):
        assert score_main([str(files / name), "-o", str(tmp_path / "s.jsonl"), "--turns", "all",
                           "--cache", str(tmp_path / "cache.sqlite"), "--dry-run"]) == 0
        assert "dry run: 2 records" in capsys.readouterr().out
