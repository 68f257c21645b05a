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
from phased_jax.formats import Turn, as_messages

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Conversations rendered together: every prefix of each is held as text until it is tokenised
# (UltraChat's 200K at once would be gigabytes of prefixes).
CHUNK = 512


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


class TemplateRefused(ValueError):
    """The chat template raised on a conversation (e.g. Mistral's refuses a system turn);
    `index`: which of the conversations rendered together."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def render_chat(turns: Sequence[Turn], tokenizer: Any, add_generation_prompt: bool = False) -> str:
    """The conversation as the chat template writes it."""
    chat_template(tokenizer)
    try:
        return tokenizer.apply_chat_template(as_messages(turns), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja's TemplateError and whatever the template raises
        raise TemplateRefused(0, f"the chat template refused the conversation ({e})") from e


def encode_chat_prompt(turns: Sequence[Turn], tokenizer: Any) -> list[int]:
    """Ids that ask the model for the next assistant turn of a conversation ending in a user
    turn: the rendering with the generation prompt, tokenised as training tokenises."""
    text = render_chat(turns, tokenizer, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render_all(chats: list[list[dict[str, str]]], tokenizer: Any, add_generation_prompt: bool
                ) -> list[str]:
    """Many renderings in one call; a template that raises on one is retried one by one, so
    the error names that one (TemplateRefused(k))."""
    if not chats:
        return []
    try:
        return tokenizer.apply_chat_template(chats, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception:  # find which one
        for k, chat in enumerate(chats):
            try:
                tokenizer.apply_chat_template(chat, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
            except Exception as e:  # jinja's TemplateError and whatever the template raises
                raise TemplateRefused(k, f"the chat template refused the conversation ({e})") \
                    from e
        raise


class NotPrefixes(TemplateRefused):
    """The template renders conversation `index`'s beginning otherwise than inside the whole
    (e.g. Mistral v0.3's puts the system prompt in the last user turn)."""


NOT_PREFIXES = ("the tokenizer's chat template does not render a conversation's beginning as the "
                "beginning of the whole conversation, so its answers cannot be located; add "
                "{% generation %} ... {% endgeneration %} around the assistant content in the "
                "template (transformers' assistant mask) or use another template")


def answer_char_spans(conversations: Sequence[Sequence[Turn]], tokenizer: Any
                      ) -> list[tuple[str, list[tuple[int, int]]]]:
    """Each conversation's full rendering and the [start, end) characters of each of its
    assistant turns (the conversations end with one: the last answer's rendering is the
    whole). TemplateRefused(k) names the conversation a template raised on."""
    chat_template(tokenizer)
    owner, asked_chats, answered_chats = [], [], []
    for c, turns in enumerate(conversations):
        messages = as_messages(turns)
        for k, t in enumerate(turns):
            if t.role == "assistant":
                owner.append(c)
                asked_chats.append(messages[:k])
                answered_chats.append(messages[:k + 1])
    try:
        asked = _render_all(asked_chats, tokenizer, True)
        answered = _render_all(answered_chats, tokenizer, False)
    except TemplateRefused as e:
        raise TemplateRefused(owner[e.index], str(e)) from e
    last = {c: i for i, c in enumerate(owner)}  # each conversation's last answer: its whole
    out: list[tuple[str, list[tuple[int, int]]]] = [
        (answered[last[c]] if c in last else "", []) for c in range(len(conversations))]
    for c, a, b in zip(owner, asked, answered, strict=True):
        full, spans = out[c]
        if not (b.startswith(a) and full.startswith(b)):
            raise NotPrefixes(c, NOT_PREFIXES)
        spans.append((len(a), len(b.rstrip())))
    return out


def answer_tokens(encoding: Any, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, end) token range of each char span: every token that overlaps it
    (transformers' rule for its assistant mask), from a `tokenizers` Encoding."""
    out = []
    offsets = None
    for s, e in spans:
        a, b = encoding.char_to_token(s), encoding.char_to_token(e - 1)
        if a is None or b is None:  # a span edge on a character no token holds: scan the offsets
            if offsets is None:
                offsets = np.asarray(encoding.offsets, np.int64).reshape(-1, 2)
            hit = np.flatnonzero((offsets[:, 0] < e) & (offsets[:, 1] > s))
            if not len(hit):
                raise ConfigError(f"an assistant turn (characters {s}:{e} of the rendering) "
                                  "holds no token; the chat template renders it empty")
            a, b = int(hit[0]), int(hit[-1])
        out.append((a, b + 1))
    return out


def runs(mask: Sequence[int] | np.ndarray) -> tuple[tuple[int, int], ...]:
    """[start, end) of each run of ones (or True): each answer of a mask."""
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
    def where(k: int) -> str:
        return sources[k] if sources else f"conversation {k + 1}"

    def refused(k: int, e: Exception) -> DataError:
        return DataError(f"{where(k)}: {e}; use a chat template that takes this conversation or "
                         "remove the record")

    if GENERATION_TAG.search(chat_template(tokenizer)):
        out = []
        for k, turns in enumerate(conversations):
            try:
                enc = tokenizer.apply_chat_template(as_messages(turns), tokenize=True,
                                                    return_dict=True,
                                                    return_assistant_tokens_mask=True)
            except Exception as e:  # the template raised
                raise refused(k, TemplateRefused(k, f"the chat template refused the "
                                                    f"conversation ({e})")) from e
            out.append(_example(enc["input_ids"], runs(enc["assistant_masks"])))
        return out
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or backend is None:
        raise ConfigError("conversation data needs a fast tokenizer (a tokenizer.json) to place "
                          "the answers' tokens; data.tokenizer has only a slow one")
    out = []
    for start in range(0, len(conversations), CHUNK):  # a chunk's renderings at a time in memory
        try:
            rendered = answer_char_spans(conversations[start:start + CHUNK], tokenizer)
        except NotPrefixes as e:
            raise ConfigError(f"{where(start + e.index)}: {e}") from e
        except TemplateRefused as e:
            raise refused(start + e.index, e) from e
        # The backend is what `tokenizer(text, add_special_tokens=False)` runs (the ids of
        # transformers' apply_chat_template); its encodings map characters to tokens.
        encodings = backend.encode_batch([text for text, _ in rendered], add_special_tokens=False)
        out += [_example(enc.ids, answer_tokens(enc, spans))
                for enc, (_, spans) in zip(encodings, rendered, strict=True)]
    return out


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
