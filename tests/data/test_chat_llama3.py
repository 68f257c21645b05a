"""`data.template=chat` with a Llama-3-shaped tokenizer and Meta's own chat template: the ids,
the loss mask, the padding of a tokenizer without a pad token, and the tokens that end answers."""

import numpy as np
import pytest

from phased_jax.data.records import Record
from phased_jax.data.templates import encode_prompt, stop_ids
from phased_jax.data.tokens import build_rows, pad_id_of, tokenize
from tests.data.llama3_tokenizer import (
    BOT,
    END_HEADER,
    EOT,
    EOT_TEXT,
    START_HEADER,
    build_llama3_tokenizer,
)

REC = Record("1", "Translate the sentence.", "The cat sat.", "  Le chat.\n", 2.0, "m:1")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_llama3_tokenizer(tmp_path_factory.mktemp("llama3_tok"))


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_ids_and_loss_mask(tok):
    ex, rep = tokenize([REC], "chat", tok, 128)
    ids, trained = ex.example(0)
    p = int(np.argmax(trained))
    prompt = [BOT, START_HEADER, *enc(tok, "user"), END_HEADER,
              *enc(tok, "\n\nTranslate the sentence.\nThe cat sat."), EOT,
              START_HEADER, *enc(tok, "assistant"), END_HEADER, *enc(tok, "\n\n")]
    target = [*enc(tok, "Le chat."), EOT]  # Meta's template trims the answer
    assert ids.tolist() == prompt + target and rep.truncated == 0
    assert trained.tolist() == [False] * len(prompt) + [True] * len(target)
    # one BOS (the template writes it; the post-processor's is not added), and every special
    # token is its own id: no "<|...|>" text was split into byte pieces
    assert ids.tolist().count(BOT) == 1
    assert not {t for t in ids.tolist() if t < BOT} & set(enc(tok, "<|"))
    assert tok.decode(ids) == "".join(tok.apply_chat_template(
        [{"role": "user", "content": "Translate the sentence.\nThe cat sat."},
         {"role": "assistant", "content": REC.output}], tokenize=False))
    assert ids[:p].tolist() == encode_prompt(REC.instruction, REC.input, "chat", tok)

    row = build_rows(ex, [np.array([0]), None])
    n = len(ids)
    # loss on the answer and its <|eot_id|> only: targets at positions p-1 .. n-2
    assert np.flatnonzero(row["loss_mask"][0]).tolist() == list(range(p - 1, n - 1))
    assert row["targets"][0][row["loss_mask"][0] == 1].tolist() == target
    assert EOT_TEXT not in ids.tolist()  # the chat format ends answers with <|eot_id|>, not EOS


def test_pad_without_pad_or_unk_token_is_eos(tok):
    """Llama-3 has no pad and no unk token: pad with EOS (<|end_of_text|>), as the preset does,
    not id 0 (a real text token, "!" in Meta's vocabulary)."""
    assert pad_id_of(tok) == tok.eos_token_id == EOT_TEXT
    ex, _ = tokenize([REC], "chat", tok, 128)
    assert ex.pad_id == EOT_TEXT
    row = build_rows(ex, [np.array([0]), None])
    n = len(ex.example(0)[0])
    assert (row["input_ids"][0, n:] == EOT_TEXT).all() and (row["input_ids"][1] == EOT_TEXT).all()
    assert row["loss_mask"][:, n - 1:].sum() == 0 and (row["segment_ids"][0, n:] == 0).all()


def test_stop_ids_end_answers_where_training_ended_them(tok, tokenizer):
    assert stop_ids("chat", tok) == [EOT_TEXT, EOT]  # EOS, and the chat answer's <|eot_id|>
    for template in ("authors", "alpaca", "text"):  # their targets end with EOS itself
        assert stop_ids(template, tok) == [EOT_TEXT]
    assert stop_ids("chat", tokenizer) == [2]  # the toy tokenizer's chat ends answers with </s>
    assert stop_ids(None, tok) == [EOT_TEXT]  # raw prompts: EOS only
