"""Conversations: token ids and the loss mask against transformers' own, exact zero gradient
outside the assistant turns, and truncation by whole trailing turns."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phased_jax.data.chat import CHUNK, encode_chat_prompt, tokenize_conversations
from phased_jax.data.records import Record, read_records
from phased_jax.data.tokens import build_rows, pack, tokenize
from phased_jax.errors import ConfigError, DataError
from phased_jax.formats import Turn
from phased_jax.formats import as_messages as messages
from phased_jax.train.loss import make_loss_fn
from tests.data.chat_templates import TEMPLATES, build_sentencepiece_tokenizer
from tests.data.llama3_tokenizer import EOT, build_llama3_tokenizer

QUESTIONS = ["Translate the sentence into French.", "  Give three tips for staying healthy.",
             "The cat sat on the mat.\nWhere is the cat?", "Summarize: eat a balanced diet."]
ANSWERS = ["Le chat est sur le tapis.", "Eat a balanced diet and exercise regularly.  ",
           " The cat sat on the mat.", "Eat well."]
SYSTEM = "You are a helpful assistant."


def conversation(exchanges: int, system: bool) -> tuple[Turn, ...]:
    turns = [Turn("system", SYSTEM)] if system else []
    for k in range(exchanges):
        turns += [Turn("user", QUESTIONS[k]), Turn("assistant", ANSWERS[k])]
    return tuple(turns)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    out = {}
    for name, (template, _, _, kind) in TEMPLATES.items():
        root = tmp_path_factory.mktemp(name)
        if kind == "llama3":
            tok = build_llama3_tokenizer(root)
            tok.chat_template = template
        else:
            tok = build_sentencepiece_tokenizer(root, template)
        out[name] = tok
    return out


def hf_masked(tok, turns, marked):
    """transformers' ids and assistant mask, from the template's twin that marks generations."""
    enc = tok.apply_chat_template(messages(turns), chat_template=marked, tokenize=True,
                                  return_dict=True, return_assistant_tokens_mask=True)
    return enc["input_ids"], enc["assistant_masks"]


CASES = [(name, n, system) for name, (_, _, takes_system, _) in TEMPLATES.items()
         for n in (1, 2, 4) for system in ((False, True) if takes_system else (False,))]


@pytest.mark.parametrize("name,exchanges,system", CASES,
                         ids=[f"{n}-{k}turns-{'system' if s else 'nosystem'}" for n, k, s in CASES])
def test_ids_and_mask_equal_transformers(tokenizers, name, exchanges, system):
    template, marked, _, _ = TEMPLATES[name]
    tok = tokenizers[name]
    turns = conversation(exchanges, system)
    # the twin renders the same text: only the generation marks differ
    assert (tok.apply_chat_template(messages(turns), tokenize=False)
            == tok.apply_chat_template(messages(turns), chat_template=marked, tokenize=False))
    want_ids, want_mask = hf_masked(tok, turns, marked)
    assert want_ids == tok.apply_chat_template(messages(turns), tokenize=True,
                                               return_dict=True)["input_ids"]
    (ex,) = tokenize_conversations([turns], tok)  # prefix by prefix: the template has no marks
    assert ex.ids.tolist() == want_ids
    assert ex.trained.astype(int).tolist() == want_mask
    assert len(ex.answers) == exchanges
    # every answer trained, with the token that ends it
    for (a, b), answer in zip(ex.answers, ANSWERS, strict=False):
        assert answer.strip() in tok.decode(ex.ids[a:b]) and ex.ids[b - 1] in (
            EOT, tok.eos_token_id)
    # the marked template goes through transformers' mask: the same example
    tok.chat_template = marked
    try:
        (marked_ex,) = tokenize_conversations([turns], tok)
    finally:
        tok.chat_template = template
    assert marked_ex.ids.tolist() == want_ids and marked_ex.answers == ex.answers
    # the prompt of the last answer, as generation encodes it, is what training saw before it
    last_user = len(turns) - 1
    prompt = encode_chat_prompt(turns[:last_user], tok)
    assert ex.ids[:len(prompt)].tolist() == prompt and len(prompt) == ex.answers[-1][0]


def test_a_template_that_refuses_a_conversation_names_the_record(tokenizers):
    """Rendered in chunks of many: the one refused is named, in a later chunk too."""
    records = [Record(str(i), "q", "", "a", 2.0, f"data.jsonl:{i + 1}",
                      conversation(1 + i % 2, system=i == 600)) for i in range(700)]
    assert 600 >= CHUNK  # the refused one is past the first chunk
    with pytest.raises(DataError, match=r"^data\.jsonl:601: the chat template refused the "
                       r"conversation \(Conversation roles must alternate"):
        tokenize(records, "chat", tokenizers["mistral"], 256)
    examples, _ = tokenize(records[:600] + records[601:], "chat", tokenizers["mistral"], 256)
    assert len(examples) == 699


def test_conversations_need_the_chat_template(tokenizers):
    rec = Record("7", "q", "", "a", 2.0, "data.jsonl:7", conversation(2, system=False))
    with pytest.raises(Exception, match=r"data\.jsonl:7 is a conversation, which "
                       r"data.template='authors' cannot render; set data.template=chat"):
        tokenize([rec], "authors", tokenizers["llama3"], 256)


@pytest.mark.parametrize("loss_chunk", [0, 8])
def test_no_gradient_outside_assistant_turns(tokenizers, loss_chunk):
    """The train loss (z-loss on) on a packed row of two conversations and padding: the
    gradient at every position whose next token is not an assistant token (transformers'
    mask) is exactly zero; at every other position it is not."""
    tok = tokenizers["llama3"]
    convs = [conversation(2, True), conversation(4, False)]
    records = [Record(str(i), "q", "", "a", 2.0, f"m:{i}", c) for i, c in enumerate(convs)]
    L = 512
    examples, _ = tokenize(records, "chat", tok, L)
    assert pack(examples.lengths, L).tolist() == [0, 2]  # one row, both packed
    rows = build_rows(examples, [np.array([0, 1])])
    want = np.zeros(L, bool)  # position j is trained iff token j + 1 is an assistant token
    at = 0
    for turns in convs:
        _, mask = hf_masked(tok, turns, TEMPLATES["llama3"][1])
        want[at:at + len(mask) - 1] = np.asarray(mask[1:], bool)
        at += len(mask)
    assert at < L and want.sum() > 20
    V, D = len(tok), 16

    class Stub:  # the model's outputs as parameters: the gradient lands on each position
        def apply(self, variables, *_, return_hidden=False, **__):
            p = variables["params"]
            return (p["x"], p["head"]) if return_hidden else p["x"] @ p["head"]

    rng = np.random.RandomState(0)
    params = {"x": jnp.asarray(rng.randn(1, L, D), jnp.float32),
              "head": jnp.asarray(rng.randn(D, V), jnp.float32)}
    loss_fn = make_loss_fn(Stub(), z_loss=1e-4, loss_chunk=loss_chunk)
    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    grads = jax.grad(lambda p: loss_fn(p, batch)[0])(params)
    per_position = np.abs(np.asarray(grads["x"][0])).max(axis=-1)
    assert np.all(per_position[~want] == 0)  # exactly
    assert np.all(per_position[want] > 0)


def test_truncation_drops_whole_trailing_turns(tokenizers, tmp_path):
    tok = tokenizers["llama3"]
    turns = conversation(4, True)
    (full,) = tokenize_conversations([turns], tok)
    a2, b2 = full.answers[1]
    a3, _ = full.answers[2]
    for max_length in (b2, a3 + 2):  # the second answer's end; inside the third answer
        rec = Record("1", "q", "", "a", 2.0, "m:1", turns)
        ex, rep = tokenize([rec], "chat", tok, max_length)
        ids, trained = ex.example(0)
        assert ids.tolist() == full.ids[:b2].tolist() and ids[-1] == EOT
        assert trained.tolist() == full.trained[:b2].tolist()  # no answer cut in its mask
        assert (rep.truncated, rep.turns_dropped, rep.skipped) == (1, 2, [])
    a1, b1 = full.answers[0]
    ex, rep = tokenize([Record("1", "q", "", "a", 2.0, "m:1", turns)], "chat", tok, b1 - 1)
    assert len(ex) == 0 and rep.skipped[0]["reason"] == "first_answer_exceeds_max_length"


def test_data_report_counts_skipped_conversations(tokenizers, tmp_path):
    from phased_jax.config import get_default_config
    from tests.data.conftest import prepare_config

    tok = tokenizers["llama3"]
    long_first = [{"role": "user", "content": "Give three tips for staying healthy. " * 30},
                  {"role": "assistant", "content": "Eat well."}]
    rows = [{"id": f"r{i}", "score": 1 + i % 5, "messages": messages(conversation(1 + i % 4,
                                                                                 i % 2 == 0))}
            for i in range(12)] + [{"id": "long", "score": 2, "messages": long_first}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = get_default_config()
    c.data.paths = (str(path),)
    c.data.template = "chat"
    c.data.max_length = 96
    c.output_dir = str(tmp_path / "out")
    prepared = prepare_config(c, tok)
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    skipped = report["tokens"]["records"]
    assert report["tokens"]["skipped"] == 1 and skipped[0]["id"] == "long"
    assert skipped[0]["reason"] == "first_answer_exceeds_max_length"
    assert report["tokens"]["truncated"] >= 1 and report["tokens"]["turns_dropped"] >= 1
    assert "skipped (first_answer_exceeds_max_length)" in prepared.summary()
    records, _ = read_records(str(path))
    assert [len(r.messages) for r in records][:4] == [3, 4, 7, 8]


def test_a_template_whose_prefixes_differ_is_refused_naming_the_record(tokenizers):
    """Mistral-7B-Instruct-v0.3's way with a system prompt: it goes into the last user turn, so
    a conversation's beginning renders otherwise than inside the whole; without generation
    marks its answers cannot be located."""
    tok = tokenizers["mistral"]
    folded = ("{%- if messages[0]['role'] == 'system' %}{%- set system_message = "
              "messages[0]['content'] %}{%- set loop_messages = messages[1:] %}{%- else %}"
              "{%- set loop_messages = messages %}{%- endif %}{{- bos_token }}"
              "{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
              "{%- if loop.last and system_message is defined %}{{- '[INST] ' + system_message "
              "+ '\\n\\n' + message['content'] + '[/INST]' }}{%- else %}{{- '[INST] ' + "
              "message['content'] + '[/INST]' }}{%- endif %}{%- elif message['role'] == "
              "'assistant' %}{{- ' ' + message['content'] + eos_token}}{%- endif %}{%- endfor %}")
    records = [Record(str(i), "q", "", "a", 2.0, f"data.jsonl:{i + 1}", conversation(2, i == 1))
               for i in range(3)]
    tok.chat_template = folded
    try:
        assert len(tokenize(records[:1], "chat", tok, 256)[0]) == 1  # no system turn: fine
        with pytest.raises(ConfigError, match=r"^data\.jsonl:2: the tokenizer's chat template "
                           r"does not render a conversation's beginning"):
            tokenize(records, "chat", tok, 256)
    finally:
        tok.chat_template = TEMPLATES["mistral"][0]
