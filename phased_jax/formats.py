"""Instruction-data and answer formats: which one a file holds, its rows, each row's fields.

The one parser of training (`phased_jax.data.records` adds validation and the skip report) and
of `phased-score` (`phased_tools.records` stops at the first problem and keeps empty outputs):
each caller decides what a problem costs, not how a row is read.

- `alpaca`: a JSON list of `{"instruction", "input", "output"}` (Stanford Alpaca).
- `authors`: JSONL `{"id", "score", "data": ["<instruction>\\n<input>", "<output>"]}` (the Phased
  IFT release). The prompt is split at its first newline into instruction and input; the score
  is a string that may carry trailing newlines.
- `jsonl`: JSONL (or a JSON list) with named fields (`DEFAULT_FIELDS`, or the caller's names).
- `messages`: conversations, OpenAI-style: `{"messages": [{"role", "content"}, ...]}` (UltraChat,
  Tulu), roles system, user, assistant.
- `sharegpt`: conversations, ShareGPT-style: `{"conversations": [{"from", "value"}, ...]}`, roles
  system, human (user), gpt (assistant).
  A conversation is an optional system turn, then user and assistant turns in turn, starting
  with a user turn; tool turns are refused. Its row's `instruction` is the first user turn and
  its `output` the first answer, so single-turn tools (the paper's scoring prompt) see the
  first exchange; `messages` holds the whole conversation.
- answers: `AnswerRow`, one `{test_set, id, instruction, input, output}` a line (an answer in
  a conversation adds `messages`, the whole conversation), what `phased-jax generate` and the
  demo write and `phased-judge` reads.

Bytes are read by `phased_jax.fileio`: a bad byte, an over-long record or bad JSON is a
`BadRecord` of its own line (or list item); a JSON list broken between its items is a
`ListError`, since the rest of it cannot be located. JAX-free: the tools import it.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from phased_jax.fileio import (
    LONE_SURROGATE,
    SURROGATE_ESCAPE,
    BadRecord,
    encodable,
    jsonl_records,
    open_bytes,
    read_head,
    read_text,
)

DEFAULT_FIELDS = {"instruction": "instruction", "input": "input", "output": "output",
                  "score": "score", "id": "id", "messages": "messages",
                  "conversations": "conversations"}
CONVERSATION_FORMATS = ("messages", "sharegpt")
# (role field, content field, the list field's key in DEFAULT_FIELDS) of each conversation style
_STYLE = {"messages": ("role", "content", "messages"),
          "sharegpt": ("from", "value", "conversations")}
# role as written -> system | user | assistant (ShareGPT dumps name their assistants variously)
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user",
         "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
         "model": "assistant"}
TOOL_ROLES = frozenset({"tool", "function", "function_call", "function_response", "observation",
                        "ipython", "tool_call", "tool_calls", "tool_response"})
_WS = re.compile(r"[ \t\n\r]*")
# Bytes that are not UTF-8 read (errors="surrogateescape") as U+DC80..U+DCFF, which valid UTF-8
# never yields: an item holding one is a bad record, not a crash of the whole file.
_UNDECODABLE = re.compile("[\udc80-\udcff]")


class InputError(ValueError):
    """Bad input data (the tools' one error line); the message names the file, the line and
    what to do."""


class RowError(ValueError):
    """A row that cannot be used as it stands; `reason` is its key in a skip report
    (`missing_field`, `bad_type`, ...; training's validation adds its own)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class ListError(ValueError):
    """A JSON list broken between its items, at `line`; `syntax` is the JSON parser's own
    message when the list is not valid JSON there (None for a structural or byte problem)."""

    def __init__(self, line: int, message: str, syntax: str | None = None):
        super().__init__(message)
        self.line, self.syntax = line, syntax


class Missing:
    """The value of a field a row does not have (None is a value: JSON null)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING = Missing()


class Turn(NamedTuple):
    """One turn of a conversation; `role` is system, user or assistant."""

    role: str
    content: str


def user_text(instruction: str, input_: str) -> str:
    """Instruction and input as one user message: joined by a newline when there is an input."""
    return f"{instruction}\n{input_}" if input_ else instruction


def exchange(instruction: str, input_: str, output: str) -> tuple[Turn, Turn]:
    """A single-turn row as a conversation: one user turn and its answer."""
    return Turn("user", user_text(instruction, input_)), Turn("assistant", output)


def as_messages(turns: Collection[Turn]) -> list[dict[str, str]]:
    """Turns as `[{"role", "content"}, ...]`: what chat templates and answer files take."""
    return [{"role": t.role, "content": t.content} for t in turns]


_SHAPES = {True: ("a conversation", "conversations"), False: ("a single-turn row", "single-turn rows")}


def check_shape(talk: bool, first: bool, first_where: str) -> None:
    """RowError (`mixed_shapes`) unless a row (a conversation: `talk`) has the shape of its
    file's first row (at `first_where`): scores and phases of a mixed file would mix prompts."""
    if talk != first:
        raise RowError("mixed_shapes", f"{_SHAPES[talk][0]} in a file of {_SHAPES[first][1]} "
                       f"(the first row, {first_where}); a file holds one shape: split it")


@dataclass(frozen=True)
class Row:
    """What one row says in its format, before any caller decides what is valid."""

    instruction: str
    input: str
    output: str
    score: Any  # the score field as written ("4.25\n\n", 3.5, ...), or MISSING
    id: Any  # the id field as written, or MISSING
    score_field: str  # where the score was looked for, for messages
    messages: tuple[Turn, ...] = ()  # a conversation's turns; () for a single-turn row


def parse_score_text(s: Any) -> float | None:
    """A released score ("4", "4.25\\n\\n", 3.5) as a float, or None when it is not a number."""
    if isinstance(s, bool):
        return None
    if isinstance(s, int | float):
        return float(s)
    if isinstance(s, str):
        try:
            return float(s.strip())
        except ValueError:
            return None
    return None


def is_json_list(head: bytes) -> bool:
    """Whether a file starting with `head` holds a JSON list (else it is JSONL)."""
    return head.removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"[")


def looks_like_authors(obj: Mapping[str, Any], instruction_field: str = "instruction") -> bool:
    """Whether a row is in the authors' shape: a `data` list and no instruction field."""
    return isinstance(obj.get("data"), list) and instruction_field not in obj


def _item_problem(text: str, start: int, end: int, obj: Any, line: int, item: int,
                  max_record_bytes: int, lone_escapes: bool) -> BadRecord | None:
    if bad := _UNDECODABLE.search(text, start, end):
        return BadRecord(line, "not_utf8", f"not UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x})",
                         item=item)
    if (end - start) * 4 > max_record_bytes:  # a char is at most 4 bytes: count only if it may matter
        n = len(text[start:end].encode("utf-8", errors="surrogateescape"))
        if n > max_record_bytes:
            return BadRecord(line, "too_long", f"record too long ({n:,} bytes > "
                             f"{max_record_bytes:,})", n, item)
    if lone_escapes and not encodable(obj):
        return BadRecord(line, "malformed", LONE_SURROGATE, item=item)
    return None


def json_list_records(text: str, max_record_bytes: int) -> Iterator[tuple[int, int, Any]]:
    """(line, item number, item or BadRecord) of a file holding one JSON list.

    Parsed item by item, so each can be sized (UTF-8 bytes of its JSON text) and named by its
    line. `text` may carry undecodable bytes as surrogate escapes: an item holding one is a
    `not_utf8` BadRecord. Raises ListError where the list itself is broken.
    """
    decoder = json.JSONDecoder()
    lone_escapes = SURROGATE_ESCAPE.search(text) is not None

    def broken(pos: int, message: str, syntax: str | None = None) -> ListError:
        if bad := _UNDECODABLE.match(text, pos):  # a bad byte outside the items breaks the list
            message, syntax = f"not UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x})", None
        return ListError(text.count("\n", 0, pos) + 1, message, syntax)

    i = _WS.match(text).end()
    if not text.startswith("[", i):
        raise broken(i, "expected a JSON list")
    i = _WS.match(text, i + 1).end()
    line, counted, k = 1, 0, 0
    while not text.startswith("]", i):
        k += 1
        line += text.count("\n", counted, i)
        counted = i
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise broken(e.pos, f"not valid JSON ({e.msg} at column {e.colno})", e.msg) from None
        except (ValueError, RecursionError) as e:
            why = str(e)[:100] or type(e).__name__
            raise broken(i, f"not valid JSON (item {k}: {why})", why) from None
        bad = _item_problem(text, i, end, obj, line, k, max_record_bytes, lone_escapes)
        yield line, k, obj if bad is None else bad
        i = _WS.match(text, end).end()
        if text.startswith(",", i):
            i = _WS.match(text, i + 1).end()
        elif i >= len(text):
            raise broken(i, "the list is not closed with ']'")
        elif not text.startswith("]", i):
            raise broken(i, f"expected ',' or ']' after item {k}")
    i = _WS.match(text, i + 1).end()
    if i < len(text):
        raise broken(i, "extra data after the list")


def file_records(path: str | Path, max_record_bytes: int, error: type[Exception] = ValueError,
                 *, strict_utf8: bool = False) -> Iterator[tuple[int, int, Any]]:
    """(line, item number or 0, parsed row or BadRecord) of a JSON list or a JSONL file.

    `strict_utf8`: a bad byte anywhere in a JSON list fails the whole file (as `error`) instead
    of its item. JSONL is always read line by line.
    """
    path = Path(path)
    if not is_json_list(read_head(path, error)):
        for line, obj in jsonl_records(path, max_record_bytes, error):
            yield line, 0, obj
        return
    if strict_utf8:
        text = read_text(path, error)
    else:
        with open_bytes(path, error) as f:
            text = f.read().removeprefix(codecs.BOM_UTF8).decode("utf-8", "surrogateescape")
    yield from json_list_records(text, max_record_bytes)


def detect_format(path: str | Path, max_record_bytes: int, error: type[Exception] = ValueError,
                  instruction_field: str = "instruction") -> str:
    """`messages` or `sharegpt` when the first row is a conversation, else `alpaca` (a JSON
    list), `authors` or `jsonl` by the first row; an empty file is `error`. An unreadable first row says `jsonl`: reading it then names what is wrong."""
    path = Path(path)
    fields = {**DEFAULT_FIELDS, "instruction": instruction_field}
    if is_json_list(read_head(path, error)):
        for _, _, obj in file_records(path, max_record_bytes, error):
            return conversation_style(obj, fields) or "alpaca"
        return "alpaca"
    for _, obj in jsonl_records(path, max_record_bytes, error):
        if isinstance(obj, BadRecord):
            return "jsonl"
        if style := conversation_style(obj, fields):
            return style
        return "authors" if looks_like_authors(obj, instruction_field) else "jsonl"
    raise error(f"{path}: the file is empty")


def _text(obj: Mapping[str, Any], name: str, optional: bool) -> str:
    if not name:
        return ""  # the format has no such field
    if obj.get(name) is None:
        if optional:
            return ""
        if name not in obj:
            raise RowError("missing_field",
                             f"missing field {name!r} (fields present: {sorted(obj)})")
    value = obj[name]
    if not isinstance(value, str):
        raise RowError("bad_type", f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def conversation_style(obj: Any, fields: Mapping[str, str] = DEFAULT_FIELDS,
                       fmt: str = "auto") -> str | None:
    """`messages` or `sharegpt` when a row is a conversation in format `fmt`, else None.

    A forced conversation format says so for every row; `auto`, `scored`, `jsonl` and `hf` look
    for the list field (`fields["messages"]`, then `fields["conversations"]`); `alpaca` and
    `authors` rows never are.
    """
    if fmt in CONVERSATION_FORMATS:
        return fmt
    if fmt in ("alpaca", "authors") or not isinstance(obj, dict):
        return None
    for style in CONVERSATION_FORMATS:
        name = list_field(style, fields)
        if name and name in obj:
            return style
    return None


def list_field(style: str, fields: Mapping[str, str] = DEFAULT_FIELDS) -> str:
    """The name of a conversation style's list field (`messages`, `conversations`, or the
    caller's name for it)."""
    return {**DEFAULT_FIELDS, **fields}[_STYLE[style][2]]


def conversation_turns(value: Any, field_name: str, style: str, *,
                       answered: bool = True) -> tuple[Turn, ...]:
    """The turns of a conversation list; RowError (with a skip-report reason) unless it is an
    optional system turn, then user and assistant turns in turn from a user turn, each with
    text. `answered` (training and scoring data): it holds an answer (`no_assistant_turn`) and
    ends with one (`ends_with_user`); else (a question for generation) it ends with the user
    turn to answer (`no_user_turn`, `ends_with_answer`), earlier answers optional."""
    role_key, content_key, _ = _STYLE[style]
    if not isinstance(value, list):
        raise RowError("bad_type", f"field {field_name!r} must be a list of {{{role_key!r}, "
                       f"{content_key!r}}} turns, got {type(value).__name__}")
    if not value:
        raise RowError("no_assistant_turn" if answered else "no_user_turn",
                       f"field {field_name!r} is an empty conversation")
    turns: list[Turn] = []
    for k, t in enumerate(value, 1):
        if not isinstance(t, dict) or role_key not in t:
            raise RowError("malformed_turn", f"turn {k} must be an object with {role_key!r} and "
                           f"{content_key!r}, got {json.dumps(t, ensure_ascii=False)[:80]}")
        written = t[role_key]
        role = ROLES.get(written) if isinstance(written, str) else None
        if written in TOOL_ROLES or (role == "assistant" and t.get("tool_calls")):
            raise RowError("tool_role", f"turn {k}: tool turns ({role_key} {written!r}) are not "
                           "supported; remove tool calls from the data or skip the record")
        if role is None:
            raise RowError("unknown_role", f"turn {k}: unknown {role_key} {written!r}; use "
                           + ", ".join(sorted(ROLES)))
        content = t.get(content_key)
        if not isinstance(content, str):
            raise RowError("bad_type", f"turn {k} ({written}): {content_key!r} must be a string, "
                           f"got {type(content).__name__}")
        if not content.strip():
            raise RowError("empty_content", f"turn {k} ({written}) has empty {content_key!r}")
        if role == "system" and k > 1:
            raise RowError("roles_out_of_order", f"turn {k}: a system turn must be the first")
        previous = turns[-1].role if turns else "system"
        expected = "assistant" if previous == "user" else "user"
        if role != "system" and role != expected:
            why = ("the conversation starts with an assistant turn; it must start with a user "
                   "turn" if previous == "system" else f"two {role} turns in a row")
            raise RowError("roles_out_of_order", f"turn {k}: {why}")
        turns.append(Turn(role, content))
    if answered and not any(t.role == "assistant" for t in turns):
        raise RowError("no_assistant_turn", f"field {field_name!r} has no assistant turn")
    if answered and turns[-1].role != "assistant":
        raise RowError("ends_with_user", f"the conversation ends with a user turn (turn "
                       f"{len(turns)}) that nothing answers; remove that turn or the "
                       "conversation")
    if not answered and turns[-1].role == "system":
        raise RowError("no_user_turn", f"field {field_name!r} has only a system turn; add the "
                       "user turn to answer")
    if not answered and turns[-1].role == "assistant":
        raise RowError("ends_with_answer", f"field {field_name!r} ends with an assistant turn; "
                       "a question ends with the user turn to answer: drop the last answer")
    return tuple(turns)


def _conversation_row(obj: Mapping[str, Any], fields: Mapping[str, str], style: str) -> Row:
    name = list_field(style, fields)
    if name not in obj:
        raise RowError("missing_field", f"missing field {name!r} (a {style} conversation; fields "
                       f"present: {sorted(obj)})")
    turns = conversation_turns(obj[name], name, style)
    user = next(t.content for t in turns if t.role == "user")
    answer = next(t.content for t in turns if t.role == "assistant")
    score_field, id_field = fields.get("score", ""), fields.get("id", "")
    return Row(user, "", answer, obj.get(score_field, MISSING) if score_field else MISSING,
               obj.get(id_field, MISSING) if id_field else MISSING, score_field, turns)


def row_fields(obj: Any, fields: Mapping[str, str] = DEFAULT_FIELDS, fmt: str = "auto",
               optional: Collection[str] = ()) -> Row:
    """The fields of one parsed row; RowError if its shape does not fit.

    Authors-shaped rows (`fmt` "authors", or under "auto"/"scored" `looks_like_authors`) split
    their prompt; conversations (`conversation_style`) read their turns; other rows read
    `fields` (an empty name: the format has no such field). A field named in `optional`
    ("input") may be absent or null, read as ""; every other must be a string.
    """
    if not isinstance(obj, dict):
        raise RowError("malformed", f"expected a JSON object, got {type(obj).__name__}")
    if style := conversation_style(obj, fields, fmt):
        return _conversation_row(obj, fields, style)
    if fmt == "authors" or (fmt in ("auto", "scored")
                            and looks_like_authors(obj, fields["instruction"])):
        data = obj.get("data")
        if not (isinstance(data, list) and len(data) == 2 and all(isinstance(d, str) for d in data)):
            raise RowError("missing_field", "field 'data' must be a list of two strings "
                                              "[prompt, output] (authors' format)")
        instruction, _, input_ = data[0].partition("\n")
        return Row(instruction, input_, data[1], obj.get("score", MISSING),
                   obj.get("id", MISSING), "score")
    instruction, input_, output = (_text(obj, fields[k], k in optional)
                                   for k in ("instruction", "input", "output"))
    score_field, id_field = fields.get("score", ""), fields.get("id", "")
    return Row(instruction, input_, output,
               obj.get(score_field, MISSING) if score_field else MISSING,
               obj.get(id_field, MISSING) if id_field else MISSING, score_field)


@dataclass(frozen=True)
class AnswerRow:
    """One model answer to one test question: a line of an answer file. `where` (file:line)
    is for messages only and is not written. A conversation's answer also has `messages`, the
    whole conversation with the model's answers; its `instruction` is the last user turn and
    `output` the last answer, so single-turn readers (the judge) see the last exchange."""

    test_set: str
    id: str
    instruction: str
    input: str
    output: str
    where: str = field(default="", compare=False)
    messages: tuple[Turn, ...] = ()  # () for a single-turn question: no `messages` written

    def to_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {k: getattr(self, k)
                               for k in ("test_set", "id", "instruction", "input", "output")}
        if self.messages:
            row["messages"] = as_messages(self.messages)
        return row

    @classmethod
    def from_row(cls, obj: Mapping[str, Any], where: str) -> AnswerRow:
        """The answer on one line; InputError naming `where` for a missing or non-string field
        or a `messages` that is not the conversation this answer ends."""
        for name in ("test_set", "id", "instruction", "output"):
            if obj.get(name) is None:
                raise InputError(f"{where}: missing field {name!r}; answer files need "
                                 "{test_set, id, instruction, input, output} on every line")
        for name in ("instruction", "input", "output"):
            if obj.get(name) is not None and not isinstance(obj[name], str):
                raise InputError(f"{where}: field {name!r} must be a string")
        messages = obj.get("messages")
        turns = () if messages is None else answered_conversation(
            messages, obj["instruction"], obj["output"], where)
        return cls(str(obj["test_set"]), str(obj["id"]), obj["instruction"],
                   obj.get("input") or "", obj["output"], where, turns)


ANSWER_MESSAGES = ("; an answer's 'messages' is its whole conversation, [{\"role\", \"content\"}, "
                   "...]: an optional system turn, then user and assistant turns in turn, ending "
                   "with the row's instruction and output")


def answered_conversation(value: Any, instruction: str, output: str, where: str
                          ) -> tuple[Turn, ...]:
    """An answer row's `messages` as turns; InputError unless it is a conversation ending with
    the user turn `instruction` and the answer `output`. Roles are as `generate` writes them
    (system, user, assistant); a model's answer may be empty, so empty turns are allowed."""
    if not isinstance(value, list) or len(value) < 2:
        raise InputError(f"{where}: field 'messages' must be a list of two turns or more"
                         + ANSWER_MESSAGES)
    turns: list[Turn] = []
    for k, t in enumerate(value, 1):
        if not (isinstance(t, dict) and isinstance(t.get("role"), str)
                and isinstance(t.get("content"), str)):
            raise InputError(f"{where}: messages turn {k} is not an object of string 'role' and "
                             "'content'" + ANSWER_MESSAGES)
        expected = (("system", "user") if not turns else
                    ("assistant",) if turns[-1].role == "user" else ("user",))
        if t["role"] not in expected:
            raise InputError(f"{where}: messages turn {k} has role {t['role']!r} where "
                             f"{' or '.join(map(repr, expected))} goes" + ANSWER_MESSAGES)
        turns.append(Turn(t["role"], t["content"]))
    if turns[-2:] != [Turn("user", instruction), Turn("assistant", output)]:
        raise InputError(f"{where}: field 'messages' does not end with the row's instruction "
                         "(a user turn) and output (an assistant turn)" + ANSWER_MESSAGES)
    return tuple(turns)
