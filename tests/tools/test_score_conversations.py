"""phased-score on conversations (OpenAI messages, ShareGPT) against the fake server: scores,
the cache, `--turns all`, and bad conversations refused in one line naming file:line."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import FAST, read_jsonl
from fake_openai import expected_score
from phased_tools.records import load_records
from phased_tools.score import load_template, main

from phased_jax.formats import InputError, Turn

MESSAGES = [  # 2 to 4 turns, one with a system turn
    [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7."}],
    [{"role": "system", "content": "Answer in French."},
     {"role": "user", "content": "Translate 'cat'."}, {"role": "assistant", "content": "Chat."},
     {"role": "user", "content": "And 'dog'?"}, {"role": "assistant", "content": "Chien."}],
    [{"role": "user", "content": "Write a haiku about {braces}."},
     {"role": "assistant", "content": "Curly marks embrace / ..."},
     {"role": "user", "content": "Now one about rain."},
     {"role": "assistant", "content": "Soft rain on the roof / ..."}],
]
SHAREGPT = [
    [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}],
    [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Capital of Peru?"},
     {"from": "gpt", "value": "Lima."}],
    [{"from": "human", "value": "Sort [3,1,2]."}, {"from": "gpt", "value": "[1,2,3]"},
     {"from": "human", "value": "Descending?"}, {"from": "gpt", "value": "[3,2,1]"}],
]


def run(tmp: Path, srv: Any, inp: Path, out: str, *extra: str, cache: str = "cache.sqlite") -> int:
    return main([str(inp), "-o", str(tmp / out), "--base-url", srv.base_url,
                 "--cache", str(tmp / cache), *FAST, *extra])


def write_messages(path: Path, convs: list[list[dict]], key: str = "messages") -> Path:
    path.write_text("".join(json.dumps({"id": f"m{i}", key: c}) + "\n" for i, c in enumerate(convs)))
    return path


def write_sharegpt(path: Path) -> Path:
    path.write_text(json.dumps([{"id": f"s{i}", "conversations": c} for i, c in enumerate(SHAREGPT)],
                               indent=1))
    return path


def cached_requests(cache: Path) -> list[list[dict[str, str]]]:
    """The messages of every request the cache holds an answer for."""
    with sqlite3.connect(cache) as db:
        return [json.loads(r)["messages"] for (r,) in db.execute("SELECT request FROM answers")]


def expected(inp: Path, turns: str = "first") -> list[float]:
    """The fake server's score for every record of `inp`, as the template renders it."""
    tpl = load_template(None, turns)
    return [expected_score(tpl.render(r)[-1]["content"]) for r in load_records(inp)[0]]


def test_records_keep_turns_and_the_first_exchange(tmp_path: Path) -> None:
    recs, report = load_records(write_messages(tmp_path / "m.jsonl", MESSAGES))
    assert report.format == "messages" and report.n == 3
    assert (recs[1].instruction, recs[1].input, recs[1].output) == ("Translate 'cat'.", "", "Chat.")
    assert recs[1].messages[0] == Turn("system", "Answer in French.") and len(recs[1].messages) == 5
    assert recs[1].raw["messages"] == MESSAGES[1]  # kept whole for the output
    recs, report = load_records(write_sharegpt(tmp_path / "s.json"))
    assert report.format == "sharegpt" and [r.line for r in recs] == [1, 2, 3]
    assert recs[2].messages[-1] == Turn("assistant", "[3,2,1]")


@pytest.mark.parametrize("writer", ["messages_jsonl", "sharegpt_list"])
def test_conversations_are_scored_and_a_rerun_is_served_from_the_cache(
        server, tmp_path: Path, capsys, writer: str) -> None:
    inp = (write_messages(tmp_path / "in.jsonl", MESSAGES) if writer == "messages_jsonl"
           else write_sharegpt(tmp_path / "in.json"))
    srv = server()
    assert run(tmp_path, srv, inp, "out.jsonl") == 0
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["score"] for r in rows] == expected(inp) and len(rows) == 3
    field = "messages" if writer == "messages_jsonl" else "conversations"
    source = MESSAGES if writer == "messages_jsonl" else SHAREGPT
    assert [r[field] for r in rows] == source and [r["id"][1:] for r in rows] == ["0", "1", "2"]
    assert rows[0]["scorer"]["template"] == "difficulty"
    assert len(srv.entries()) == 3
    longer = 2 if writer == "messages_jsonl" else 1
    assert f"{longer} of 3 conversation(s) go on past their first exchange" in capsys.readouterr().err
    srv.reset_log()
    assert run(tmp_path, srv, inp, "again.jsonl") == 0
    assert srv.entries() == []  # every answer from the cache
    assert read_jsonl(tmp_path / "again.jsonl") == rows
    assert "cached 3" in capsys.readouterr().err


def test_a_one_exchange_conversation_sends_the_request_of_its_alpaca_row(server, tmp_path: Path) -> None:
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "Name a prime.", "input": "", "output": "7."}]))
    srv = server()
    assert run(tmp_path, srv, alpaca, "a.jsonl") == 0
    srv.reset_log()
    with_system = [{"role": "system", "content": "Not shown by --turns first."}, *MESSAGES[0]]
    for name, conv in (("one.jsonl", MESSAGES[0]), ("sys.jsonl", with_system)):
        assert run(tmp_path, srv, write_messages(tmp_path / name, [conv]), "c.jsonl") == 0
        assert srv.entries() == []  # the very same request: the Alpaca row's cache entry
        assert read_jsonl(tmp_path / "c.jsonl")[0]["score"] == read_jsonl(tmp_path / "a.jsonl")[0]["score"]


def test_turns_all_shows_the_whole_conversation_under_its_own_keys(server, tmp_path: Path) -> None:
    inp = write_messages(tmp_path / "in.jsonl", MESSAGES)
    srv = server()
    assert run(tmp_path, srv, inp, "first.jsonl") == 0
    first_bodies = {e["body"] for e in srv.entries()}
    before = cached_requests(tmp_path / "cache.sqlite")
    srv.reset_log()
    assert run(tmp_path, srv, inp, "all.jsonl", "--turns", "all") == 0
    assert len(srv.entries()) == 3 and not first_bodies & {e["body"] for e in srv.entries()}
    rows = read_jsonl(tmp_path / "all.jsonl")
    assert [r["score"] for r in rows] == expected(inp, "all")
    assert rows[0]["scorer"]["template"] == "difficulty_conversation"
    assert rows[0]["scorer"]["template_sha256"] == load_template(None, "all").sha256
    shown = [m[-1]["content"] for m in cached_requests(tmp_path / "cache.sqlite") if m not in before]
    assert len(shown) == 3
    for conv in MESSAGES:  # every turn, in order, labelled by its role
        text = "\n\n".join(f"### {t['role'].capitalize()}:\n{t['content']}" for t in conv)
        assert sum(text in s for s in shown) == 1
    assert all("rate the difficulty of this whole task" in s for s in shown)
    srv.reset_log()
    assert run(tmp_path, srv, inp, "all2.jsonl", "--turns", "all") == 0
    assert srv.entries() == [] and read_jsonl(tmp_path / "all2.jsonl") == rows


def test_turns_all_shows_a_single_turn_row_as_one_exchange(server, tmp_path: Path) -> None:
    inp = tmp_path / "a.json"
    inp.write_text(json.dumps([{"instruction": "Sum these.", "input": "1 2", "output": "3"},
                               {"instruction": "Say hi.", "output": "Hi."}]))
    srv = server()
    assert run(tmp_path, srv, inp, "out.jsonl", "--turns", "all") == 0
    shown = [m[-1]["content"] for m in cached_requests(tmp_path / "cache.sqlite")]
    assert sum(s.startswith("### User:\nSum these.\n1 2\n\n### Assistant:\n3\n\n") for s in shown) == 1
    assert sum(s.startswith("### User:\nSay hi.\n\n### Assistant:\nHi.\n\n") for s in shown) == 1
    assert [r["score"] for r in read_jsonl(tmp_path / "out.jsonl")] == expected(inp, "all")


def test_a_renamed_list_field(server, tmp_path: Path, capsys) -> None:
    inp = tmp_path / "chat.json"
    inp.write_text(json.dumps([{"chat": c} for c in MESSAGES]))
    srv = server()
    assert run(tmp_path, srv, inp, "out.jsonl") == 2
    err = capsys.readouterr().err
    assert f"{inp}:1: missing field 'instruction'" in err and "--messages-field" in err
    assert run(tmp_path, srv, inp, "out.jsonl", "--messages-field", "chat") == 0
    assert [r["chat"] for r in read_jsonl(tmp_path / "out.jsonl")] == MESSAGES


def _turns(*pairs: tuple[str, Any]) -> list[dict[str, Any]]:
    return [{"role": r, "content": c} for r, c in pairs]


GOOD = {"messages": _turns(("user", "q"), ("assistant", "a"))}
BAD_CONVERSATIONS = {
    "two_assistants": ({"messages": _turns(("user", "q"), ("assistant", "a"), ("assistant", "b"))},
                       "turn 3: two assistant turns in a row"),
    "starts_with_assistant": ({"messages": _turns(("assistant", "a"), ("user", "q"))},
                              "turn 1: the conversation starts with an assistant turn"),
    "empty_content": ({"messages": _turns(("user", "q"), ("assistant", "  "))},
                      "turn 2 (assistant) has empty 'content'"),
    "no_assistant": ({"messages": _turns(("user", "q"))}, "field 'messages' has no assistant turn"),
    "ends_with_user": ({"messages": _turns(("user", "q"), ("assistant", "a"), ("user", "more?"))},
                       "the conversation ends with a user turn (turn 3) that nothing answers"),
    "unknown_role": ({"messages": _turns(("user", "q"), ("bot", "a"))}, "turn 2: unknown role 'bot'"),
    "not_a_list": ({"messages": "user: q\nassistant: a"},
                   "field 'messages' must be a list of {'role', 'content'} turns, got str"),
    "sharegpt_unknown_from": ({"conversations": [{"from": "human", "value": "q"},
                                                 {"from": "narrator", "value": "a"}]},
                              "turn 2: unknown from 'narrator'"),
    "single_turn_among_conversations": ({"instruction": "q", "output": "a"},
                                        "a single-turn row in a file of conversations (the first "
                                        "row, {p}:1); a file holds one shape: split it"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONVERSATIONS))
@pytest.mark.parametrize("container", ["jsonl", "list"])
def test_a_bad_conversation_is_one_line_naming_file_and_line(
        server, tmp_path: Path, capsys, case: str, container: str) -> None:
    row, what = BAD_CONVERSATIONS[case]
    first = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]} \
        if "conversations" in row else GOOD
    p = tmp_path / f"in.{'jsonl' if container == 'jsonl' else 'json'}"
    if container == "jsonl":
        p.write_text(json.dumps(first) + "\n" + json.dumps(row) + "\n")
    else:
        p.write_text(json.dumps([first, row], indent=1))  # item 2, named by its position
    srv = server()
    assert run(tmp_path, srv, p, "out.jsonl") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"phased-score: error: {p}:2: {what.replace('{p}', str(p))}"), err
    assert err.count("\n") == 1
    assert srv.entries() == [] and not (tmp_path / "out.jsonl").exists()
    with pytest.raises(InputError, match=rf"^{p}:2: "):
        load_records(p)


def test_a_conversation_among_single_turn_rows_names_the_first_row(server, tmp_path: Path, capsys) -> None:
    p = tmp_path / "mixed.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [{"instruction": "q", "output": "a"},
                                                    {"instruction": "r", "output": "b"}, GOOD]) + "\n")
    assert run(tmp_path, server(), p, "out.jsonl") == 2
    err = capsys.readouterr().err
    assert err == (f"phased-score: error: {p}:3: a conversation in a file of single-turn rows "
                   f"(the first row, {p}:1); a file holds one shape: split it\n")


def test_a_template_must_show_what_turns_says(server, tmp_path: Path, capsys) -> None:
    inp = write_messages(tmp_path / "in.jsonl", MESSAGES)
    conv_tpl = tmp_path / "conv.txt"
    conv_tpl.write_text("[user]\nRate this chat:\n{conversation}\n")
    srv = server()
    assert run(tmp_path, srv, inp, "out.jsonl", "--template", str(conv_tpl)) == 2
    err = capsys.readouterr().err
    assert f"{conv_tpl}: a template with {{conversation}} shows every turn; pass --turns all" in err
    assert run(tmp_path, srv, inp, "out.jsonl", "--turns", "all", "--template", str(conv_tpl)) == 0
    assert read_jsonl(tmp_path / "out.jsonl")[0]["scorer"]["template"] == "conv"
    capsys.readouterr()
    first_tpl = tmp_path / "first.txt"
    first_tpl.write_text("[user]\n{instruction} -> {output}\n")
    assert run(tmp_path, srv, inp, "out.jsonl", "--turns", "all", "--template", str(first_tpl)) == 2
    assert "with --turns all the [user] section must contain {conversation}" in capsys.readouterr().err
