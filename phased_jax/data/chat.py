"""Conversations -> token ids and the tokens that carry loss: every assistant turn, its
end-of-turn token included, never a system or user turn or the template's headers.

The conversation is rendered once by the tokenizer's chat template and tokenised as
transformers' `apply_chat_template(tokenize=True)` does (the text, `add_special_tokens=False`),
so the ids are transformers' own. Where the assistant turns are:
- a template that marks them (`{% generation %}`): transformers' `return_assistant_tokens_mask`;
- any other: rendered prefix by prefix. Turn k's text is what the conversation through turn k
  adds to the conversation through turn k-1 with the generation prompt: the answer and its
  end-of-turn, not the header the generation prompt already holds, nor whitespace the template
  writes after the end-of-turn (Mistral's `</s> `, ChatML's `<|im_end|>\n`: the templates that
  mark generations leave it out too). A template that does not render a conversation's
  prefixes as prefixes of it is refused (it cannot be masked so).
A token carries loss when it overlaps an assistant span (transformers' rule for its mask).

Truncation drops whole trailing turns: the example ends with the last assistant turn whose
tokens all fit `max_length`; a conversation whose first answer does not fit is left out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from phased_jax.errors import ConfigError, DataError
from phased_jax.formats import Turn

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class ChatExample:
    """A tokenised conversation: ids, which tokens carry loss, the token span of each answer."""

    ids: np.ndarray  # int32 [n]
    trained: np.ndarray  # bool [n]: token i is a target (predicted from token i - 1)
    answers: tuple[tuple[int, int], ...]  # [start, end) token span of each assistant turn


def chat_template(tokenizer: Any) -> str:
    """The tokenizer's chat template, or a one-line ConfigError saying what is needed."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if not template:
        raise ConfigError("data.template='chat' needs data.tokenizer with a chat template "
                          "(tokenizer_config.json 'chat_template', or chat_template.jinja)")
    return template


def as_messages(turns: Sequence[Turn]) -> list[dict[str, str]]:
    return [{"role": t.role, "content": t.content} for t in turns]


class TemplateRefused(ValueError):
    """The chat template raised on a conversation (e.g. Mistral's refuses a system turn)."""


def render_chat(turns: Sequence[Turn], tokenizer: Any, add_generation_prompt: bool = False) -> str:
    """The conversation as the chat template writes it."""
    chat_template(tokenizer)
    try:
        return tokenizer.apply_chat_template(as_messages(turns), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja's TemplateError and whatever the template raises
        raise TemplateRefused(f"the chat template refused the conversation ({e})") from e


def encode_chat_prompt(turns: Sequence[Turn], tokenizer: Any) -> list[int]:
    """Ids that ask the model for the next assistant turn of a conversation ending in a user
    turn: the rendering with the generation prompt, tokenised as training tokenises."""
    text = render_chat(turns, tokenizer, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_char_spans(turns: Sequence[Turn], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the [start, end) characters of each assistant turn in it."""
    full = render_chat(turns, tokenizer)
    spans: list[tuple[int, int]] = []
    for k, t in enumerate(turns):
        if t.role != "assistant":
            continue
        asked = render_chat(turns[:k], tokenizer, add_generation_prompt=True)
        answered = render_chat(turns[:k + 1], tokenizer)
        if not (answered.startswith(asked) and full.startswith(answered)):
            raise ConfigError(
                "the tokenizer's chat template does not render a conversation's beginning as "
                "the beginning of the whole conversation, so its answers cannot be located; add "
                "{% generation %} ... {% endgeneration %} around the assistant content in the "
                "template (transformers' assistant mask) or use another template")
        spans.append((len(asked), len(answered.rstrip())))
    return full, spans


def tokens_overlapping(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
                       ) -> list[tuple[int, int]]:
    """[start, end) token index range of each char span: every token that overlaps it
    (transformers' rule for its assistant mask)."""
    off = np.asarray(offsets, np.int64).reshape(-1, 2)
    out = []
    for s, e in spans:
        hit = np.flatnonzero((off[:, 0] < e) & (off[:, 1] > s))
        if not len(hit):
            raise ConfigError(f"an assistant turn (characters {s}:{e} of the rendering) holds "
                              "no token; the chat template renders it empty")
        out.append((int(hit[0]), int(hit[-1]) + 1))
    return out


def _runs(mask: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """[start, end) of each run of ones."""
    m = np.concatenate([[0], np.asarray(mask, np.int8), [0]])
    edges = np.flatnonzero(np.diff(m))
    return tuple((int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True))


def _example(ids: Sequence[int], answers: Sequence[tuple[int, int]]) -> ChatExample:
    trained = np.zeros(len(ids), bool)
    for a, b in answers:
        trained[a:b] = True
    trained[0] = False  # nothing predicts the first token
    return ChatExample(np.asarray(ids, np.int32), trained, tuple(answers))


def tokenize_conversations(conversations: Sequence[Sequence[Turn]], tokenizer: Any,
                           sources: Sequence[str] | None = None) -> list[ChatExample]:
    """Each conversation's ids and loss tokens (see the module docstring); `sources` name the
    conversations (file:line) in the error when the template refuses one."""
    def refused(k: int, e: Exception) -> DataError:
        where = sources[k] if sources else f"conversation {k + 1}"
        return DataError(f"{where}: {e}; use a chat template that takes this conversation or "
                         "remove the record")

    if GENERATION_TAG.search(chat_template(tokenizer)):
        out = []
        for k, turns in enumerate(conversations):
            try:
                enc = tokenizer.apply_chat_template(as_messages(turns), tokenize=True,
                                                    return_dict=True,
                                                    return_assistant_tokens_mask=True)
            except Exception as e:  # the template raised
                raise refused(k, TemplateRefused(f"the chat template refused the conversation "
                                                 f"({e})")) from e
            out.append(_example(enc["input_ids"], _runs(enc["assistant_masks"])))
        return out
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("conversation data needs a fast tokenizer (a tokenizer.json) to place "
                          "the answers' tokens; data.tokenizer has only a slow one")
    rendered = []
    for k, turns in enumerate(conversations):
        try:
            rendered.append(answer_char_spans(turns, tokenizer))
        except TemplateRefused as e:
            raise refused(k, e) from e
    enc = tokenizer([text for text, _ in rendered], add_special_tokens=False,
                    return_offsets_mapping=True) if rendered else {"input_ids": []}
    return [_example(ids, tokens_overlapping(offsets, spans))
            for ids, offsets, (_, spans) in zip(enc["input_ids"], enc.get("offset_mapping", []),
                                                 rendered, strict=True)]


def fit(example: ChatExample, max_length: int) -> ChatExample | None:
    """The example cut after its last answer that fits `max_length` whole (trailing turns
    dropped), or None when even the first answer does not fit."""
    if len(example.ids) <= max_length:
        return example
    kept = [(a, b) for a, b in example.answers if b <= max_length]
    if not kept:
        return None
    end = kept[-1][1]
    return ChatExample(example.ids[:end], example.trained[:end], tuple(kept))
