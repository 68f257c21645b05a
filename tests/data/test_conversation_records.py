"""Conversations read in every shape and container; every bad one names file:line in one line,
or is skipped and counted under `on_invalid=skip`."""

import json

import datasets
import pytest

from phased_jax.data.records import read_records
from phased_jax.errors import DataError
from phased_jax.formats import Turn
from tests.data.conftest import write_jsonl


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


GOOD = msgs(("system", "Be brief."), ("user", "Hi."), ("assistant", "Hello."),
            ("user", "Bye."), ("assistant", "Goodbye."))
TURNS = tuple(Turn(t["role"], t["content"]) for t in GOOD)


def test_messages_jsonl_sharegpt_list_and_hf_dataset(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "a1", "score": 2, "messages": GOOD}])
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    b = tmp_path / "b.json"
    b.write_text(json.dumps([{"id": "b1", "score": "4\n", "conversations": [
        {"from": names[t["role"]], "value": t["content"]} for t in GOOD]}], indent=1))
    datasets.Dataset.from_list([{"id": "c1", "score": 3.0, "dialog": GOOD}]).save_to_disk(
        str(tmp_path / "ds"))
    recs, rep = read_records([str(a), str(b)])
    assert [(r.id, r.score, r.messages) for r in recs] == [("a1", 2.0, TURNS), ("b1", 4.0, TURNS)]
    assert (recs[0].instruction, recs[0].input, recs[0].output) == ("Hi.", "", "Hello.")
    assert recs[1].source == f"{b}:2" and rep.read == 2
    # an HF dataset whose list field is named by data.fields, forced and detected
    for fmt in ("messages", "auto", "hf"):
        (c,), _ = read_records(str(tmp_path / "ds"), fmt, {"messages": "dialog"})
        assert (c.id, c.score, c.messages) == ("c1", 3.0, TURNS)
    assert read_records(str(a), "messages")[0][0].messages == TURNS


def test_single_turn_records_are_one_exchange():
    from phased_jax.data.records import Record

    r = Record("1", "Translate.", "Bonjour", "Hello", None, "m:1")
    assert r.turns == (Turn("user", "Translate.\nBonjour"), Turn("assistant", "Hello"))


BAD = [
    (msgs(("user", "a"), ("assistant", "b"), ("assistant", "c")), "roles_out_of_order",
     "turn 3: two assistant turns in a row"),
    (msgs(("assistant", "b"), ("user", "a")), "roles_out_of_order",
     "turn 1: the conversation starts with an assistant turn"),
    (msgs(("user", "a"), ("system", "s"), ("assistant", "b")), "roles_out_of_order",
     "turn 2: a system turn must be the first"),
    (msgs(("user", "a"), ("assistant", "  ")), "empty_content", "turn 2 (assistant) has empty"),
    (msgs(("system", "s"), ("user", "a")), "no_assistant_turn", "has no assistant turn"),
    (msgs(("user", "a"), ("assistant", "b"), ("user", "c")), "ends_with_user",
     "ends with a user turn (turn 3)"),
    (msgs(("user", "a"), ("robot", "b")), "unknown_role", "turn 2: unknown role 'robot'"),
    (msgs(("user", "a"), ("tool", "b")), "tool_role", "turn 2: tool turns (role 'tool') are "
     "not supported"),
    ("hello", "bad_type", "field 'messages' must be a list of"),
    ([], "no_assistant_turn", "empty conversation"),
    ([{"role": "user"}], "bad_type", "turn 1 (user): 'content' must be a string"),
]


@pytest.mark.parametrize("messages,reason,words", BAD, ids=[f"{r}-{i}" for i, (_, r, _) in
                                                            enumerate(BAD)])
def test_bad_conversation_names_file_and_line_or_is_skipped(tmp_path, messages, reason, words):
    good = {"id": "ok", "score": 2, "messages": GOOD}
    p = write_jsonl(tmp_path / "c.jsonl", [good, {"id": "bad", "score": 3, "messages": messages}])
    with pytest.raises(DataError) as e:
        read_records(str(p))
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"{p}:2: ") and words in line
    assert f"[{reason}]" in line and "on_invalid=skip" in line
    recs, rep = read_records(str(p), on_invalid="skip")
    assert [r.id for r in recs] == ["ok"] and rep.counts == {reason: 1}
    assert rep.skipped[0]["source"] == f"{p}:2"


@pytest.mark.parametrize("first_is_conversation", [True, False])
def test_mixed_file_names_the_first_row_of_the_other_shape(tmp_path, first_is_conversation):
    talk = {"id": "t", "score": 2, "messages": GOOD}
    rows = [{"id": "s", "score": 2, "instruction": "Say hi.", "input": "", "output": "Hi."}]
    rows = [talk, *rows, talk | {"id": "t2"}] if first_is_conversation else [*rows, talk, rows[0]
                                                                              | {"id": "s2"}]
    p = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError, match=(
            rf"^{p}:2: a {'single-turn row' if first_is_conversation else 'conversation'} in a "
            rf"file of {'conversations' if first_is_conversation else 'single-turn rows'} "
            rf"\(the first row, {p}:1\); a file holds one shape: split it \[mixed_shapes\]")):
        read_records(str(p))
    recs, rep = read_records(str(p), on_invalid="skip")
    assert len(recs) == 2 and rep.counts == {"mixed_shapes": 1}


def test_a_directory_may_hold_a_file_of_each_shape(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"id": "t", "score": 2, "messages": GOOD}])
    write_jsonl(tmp_path / "b.jsonl", [{"id": "s", "score": 2, "instruction": "x", "input": "", "output": "y"}])
    recs, _ = read_records(str(tmp_path))
    assert [bool(r.messages) for r in recs] == [True, False]


def test_an_hf_conversation_over_max_record_bytes_is_refused(tmp_path):
    long = msgs(("user", "Hi."), ("assistant", "y" * 5000))
    datasets.Dataset.from_list([{"id": "a", "messages": GOOD}, {"id": "b", "messages": long}]
                               ).save_to_disk(str(tmp_path / "ds"))
    recs, rep = read_records(str(tmp_path / "ds"), on_invalid="skip", max_record_bytes=4000)
    assert [r.id for r in recs] == ["a"] and rep.counts == {"too_long": 1}
