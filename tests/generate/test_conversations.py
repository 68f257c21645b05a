"""`phased-jax generate` on conversations: messages/ShareGPT rows ending with a user turn, and
MT-Bench's `{"question_id", "turns": [...]}` answered turn by turn with the model's own answers.

A tiny random Llama over a Llama-3-shaped tokenizer (Meta's chat template). The CLI runs once on
the suite's 8 devices and once, in a subprocess, on one device (what most users have); every
answer is checked against greedy decoding from the conversation rendered by transformers'
`apply_chat_template` directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from phased_tools.records import load_answers

from phased_jax.cli import main as cli_main
from phased_jax.errors import DataError
from phased_jax.formats import AnswerRow, InputError, RowError, Turn, conversation_turns
from phased_jax.generate import testsets
from tests.data.llama3_tokenizer import build_llama3_tokenizer
from tests.xla import FAST_COMPILE

from .conftest import load_hf, save_tiny_hf

NEW = 8
SYSTEM = {"role": "system", "content": "Be brief."}
MESSAGES = [SYSTEM, {"role": "user", "content": "Translate the sentence into French."},
            {"role": "assistant", "content": "Le chat."},
            {"role": "user", "content": "The cat sat on the mat."}]
Q1, Q2 = "Give three tips for staying healthy.", "Translate the sentence into French."
ROWS = [{"id": "m", "messages": MESSAGES},
        {"id": "s", "conversations": [{"from": "human", "value": "Le chat."}]},
        {"question_id": 81, "category": "writing", "turns": [Q1, Q2]},
        {"question_id": 82, "category": "writing", "turns": ["The cat sat on the mat."]},
        {"instruction": "Eat a balanced diet.", "id": "plain"}]
# prompts padded to 128 in every round: the decoder compiles once for the module
ARGS = ["--max-new-tokens", str(NEW), "--config.model.dtype=float32", "--batch-size", "2",
        "--config.data.template=chat", "--length-multiple", "128", "--generator", "g"]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    """A tiny HF Llama with the Llama-3-shaped tokenizer (and its chat template) beside it."""
    d = tmp_path_factory.mktemp("chat_model")
    save_tiny_hf("llama", d, vocab_size=336)
    build_llama3_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def answered(chat_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(questions, the CLI's answers on the suite's 8 devices)."""
    root = tmp_path_factory.mktemp("conversations")
    src, out = _jsonl(root / "chat.jsonl", ROWS), root / "answers.jsonl"
    assert cli_main(["generate", "--hf", str(chat_dir), "--input", str(src), "--output", str(out),
                     *ARGS, "--config.mesh.shape=(2,-1,1)"]) == 0
    return src, out


def test_read_conversations_and_mt_bench(tmp_path):
    items = testsets.read_test_set(_jsonl(tmp_path / "mt.jsonl", ROWS))
    m, s, mt, mt1, plain = items
    assert m.turns == tuple(Turn(t["role"], t["content"]) for t in MESSAGES)
    assert (m.instruction, m.input, m.followups, m.rounds) == ("The cat sat on the mat.", "", (), 1)
    assert s.turns == (Turn("user", "Le chat."),)  # ShareGPT's human is the user
    assert (mt.id, mt.test_set, mt.turns, mt.followups) == ("81", "mt", (Turn("user", Q1),), (Q2,))
    assert (mt.instruction, mt.rounds, mt1.rounds) == (Q2, 2, 1)
    assert mt.conversation(["a1"]) == (Turn("user", Q1), Turn("assistant", "a1"), Turn("user", Q2))
    assert (plain.turns, plain.instruction) == ((), "Eat a balanced diet.")


@pytest.mark.parametrize(("row", "why"), [
    ({"messages": MESSAGES[:3]}, "field 'messages' ends with an assistant turn; a question ends "
                                 "with the user turn to answer: drop the last answer"),
    ({"messages": [SYSTEM]}, "field 'messages' has only a system turn"),
    ({"messages": []}, "field 'messages' is an empty conversation"),
    ({"conversations": [{"from": "narrator", "value": "x"}]}, "turn 1: unknown from 'narrator'"),
    ({"question_id": 1, "turns": []}, "field 'turns' must be a non-empty list of non-empty strings"),
    ({"question_id": 1, "turns": ["q", 2]}, "field 'turns' must be a non-empty list"),
])
def test_bad_conversations_name_file_and_line(tmp_path, row, why):
    src = _jsonl(tmp_path / "bad.jsonl", [{"instruction": "fine"}, row])
    with pytest.raises(DataError) as e:
        testsets.read_test_set(src)
    assert str(e.value).startswith(f"{src}:2: {why}")


def test_unanswered_conversation_turns():
    turns = [{"role": "user", "content": "q"}]
    assert conversation_turns(turns, "messages", "messages", answered=False) == (Turn("user", "q"),)
    with pytest.raises(RowError) as e:  # training's rule, the default, is unchanged
        conversation_turns(turns, "messages", "messages")
    assert e.value.reason == "no_assistant_turn"
    with pytest.raises(RowError) as e:
        conversation_turns([*turns, {"role": "assistant", "content": "a"}], "messages", "messages",
                           answered=False)
    assert e.value.reason == "ends_with_answer"


def test_answer_rows_record_the_conversation():
    plain = AnswerRow("t", "1", "q", "", "a")
    assert plain.to_row() == {"test_set": "t", "id": "1", "instruction": "q", "input": "",
                              "output": "a"}  # single-turn rows as before: no messages key
    talk = testsets.TestItem("t", "2", Q2, turns=(Turn("user", Q1),), followups=(Q2,))
    row = talk.answer("", "a2").to_row()  # an empty answer is an answer
    assert row["messages"] == [{"role": "user", "content": Q1}, {"role": "assistant", "content": ""},
                               {"role": "user", "content": Q2},
                               {"role": "assistant", "content": "a2"}]
    assert (row["instruction"], row["input"], row["output"]) == (Q2, "", "a2")
    assert AnswerRow.from_row(row, "f:1") == talk.answer("", "a2")
    assert AnswerRow.from_row(plain.to_row(), "f:1").messages == ()
    for bad, why in [({"messages": "x"}, "field 'messages' must be a list"),
                     ({"messages": row["messages"][:-1]}, "field 'messages' does not end with the row's"),
                     ({"output": "other"}, "field 'messages' does not end with the row's"),
                     ({"messages": [row["messages"][1], *row["messages"][1:]]},
                      "messages turn 1 has role 'assistant' where 'system' or 'user' goes"),
                     ({"messages": [{"role": "user"}, *row["messages"][1:]]},
                      "messages turn 1 is not an object")]:
        with pytest.raises(InputError, match=f"^f:3: {why}"):
            AnswerRow.from_row({**row, **bad}, "f:3")


def test_cli_answers_conversations_as_the_chat_template_renders_them(answered, chat_dir):
    import transformers

    from phased_jax.data.templates import stop_ids
    from phased_jax.generate.decode import generate_ids
    from phased_jax.generate.run import question_ids

    src, out = answered
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got] == ["m", "s", "81", "82", "plain"]
    rows = [AnswerRow.from_row(g, f"{out}:{n}") for n, g in enumerate(got, 1)]
    assert list(load_answers(out).values()) == rows  # what phased-judge reads
    tok = transformers.AutoTokenizer.from_pretrained(chat_dir)
    model, params = load_hf(chat_dir)

    def greedy(messages: list[dict[str, str]]) -> str:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        out_ids = generate_ids(model, params, [ids], eos_token_ids=stop_ids("chat", tok),
                               max_new_tokens=NEW, batch_size=1)[0]
        return tok.decode(out_ids, skip_special_tokens=True)

    item = testsets.read_test_set(src)[0]  # the prompt ids are transformers' own
    assert question_ids(item, (), "chat", tok) == tok.apply_chat_template(
        MESSAGES, add_generation_prompt=True)["input_ids"]

    m, s, mt, mt1, plain = got
    assert m["messages"] == [*MESSAGES, {"role": "assistant", "content": m["output"]}]
    assert (m["instruction"], m["input"], m["output"]) == (MESSAGES[-1]["content"], "",
                                                           greedy(MESSAGES))
    assert s["messages"] == [{"role": "user", "content": "Le chat."},
                             {"role": "assistant", "content": greedy(s["messages"][:1])}]
    a1, a2 = mt["messages"][1]["content"], mt["output"]
    assert a1 == greedy([{"role": "user", "content": Q1}])  # turn 1, as asked alone
    turn2 = [{"role": "user", "content": Q1}, {"role": "assistant", "content": a1},
             {"role": "user", "content": Q2}]
    assert mt["messages"] == [*turn2, {"role": "assistant", "content": a2}]
    assert a2 == greedy(turn2)  # turn 2 follows the model's own turn-1 answer
    assert mt["instruction"] == Q2 and rows[2].messages[-2:] == (Turn("user", Q2),
                                                                 Turn("assistant", a2))
    assert len(mt1["messages"]) == 2 and any(g["output"] for g in got)
    assert set(plain) == {"test_set", "id", "instruction", "input", "output", "generator"}


def test_cli_on_one_device_writes_the_same_answers(answered, chat_dir, tmp_path):
    """The CLI as most users run it: one device, no mesh flag."""
    src, eight = answered
    out = tmp_path / "one.jsonl"
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "XLA_FLAGS": FAST_COMPILE}
    code = ("import sys; from phased_jax.cli import main; "
            "sys.exit(main(['generate', *sys.argv[1:]]))")
    proc = subprocess.run([sys.executable, "-c", code, "--hf", str(chat_dir), "--input", str(src),
                           "--output", str(out), *ARGS], env=env, capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "wrote 5 answers by 'g'" in proc.stdout
    assert out.read_text() == eight.read_text()


def test_cli_conversation_errors_are_one_line(chat_dir, tmp_path, capsys):
    src = _jsonl(tmp_path / "q.jsonl", ROWS)
    out = str(tmp_path / "a.jsonl")
    base = ["generate", "--hf", str(chat_dir), "--output", out]
    assert cli_main([*base, "--input", str(src)]) == 2  # the default template, authors
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"phased-jax generate: error: {src}:1: a conversation, which data.template='authors' "
        "cannot render; add --config.data.template=chat (the tokenizer's chat template), or "
        "give single-turn questions"]

    bad = _jsonl(tmp_path / "bad.jsonl", [ROWS[0], {"messages": MESSAGES[:3]}])
    assert cli_main([*base, "--input", str(bad), "--config.data.template=chat"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{bad}:2: field 'messages' ends with an assistant turn" in err

    plain_tok = tmp_path / "no_template"
    tok = build_llama3_tokenizer(tmp_path / "tok")
    tok.chat_template = None
    tok.save_pretrained(plain_tok)
    assert cli_main([*base, "--input", str(src), "--config.data.template=chat", "--tokenizer",
                     str(plain_tok)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"phased-jax generate: error: --tokenizer {plain_tok}: the tokenizer has no chat template "
        "(tokenizer_config.json 'chat_template', or chat_template.jinja), which "
        "data.template=chat and conversations need; give one that has it with --tokenizer DIR"]

    strict_tok = tmp_path / "no_system"  # as Mistral's and Gemma's templates refuse a system turn
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}"
                         "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tok.save_pretrained(strict_tok)
    assert cli_main([*base, "--input", str(src), "--config.data.template=chat", "--tokenizer",
                     str(strict_tok)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (f"{src}:1: the chat template refused the conversation (System role not supported); "
            "change the conversation or give a --tokenizer whose template takes it") in err
    assert not Path(out).exists()
