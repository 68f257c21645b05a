"""Prompt templates: how a record becomes a masked prompt and a trained target.

A template renders into parts: text, or a `Special` standing for BOS/EOS. The tokens module
encodes text parts without special tokens and inserts the tokenizer's real BOS/EOS ids for
`Special` parts, so correctness never depends on a tokenizer parsing the string "<s>".

- `authors` (Pang et al.): prompt `<s>User: {instruction}\\n{input}</s>\\nAssistant: `,
  target `{output}</s>`. With an empty input the prompt has no newline after the instruction
  (`<s>User: {instruction}</s>\\nAssistant: `): the authors' prompt joined instruction and input
  with a newline only when there was an input (their data's prompt field has none then).
- `alpaca` (Stanford Alpaca): the standard prompt with or without the `### Input:` block, after
  BOS; target `{output}</s>`.
- `chat`: the tokenizer's `apply_chat_template` with one user turn (instruction, then input
  after a newline) and one assistant turn; the prompt is the rendering with
  `add_generation_prompt=True`, the target the rest of the full conversation. Training
  tokenises every record under `chat` as a conversation (`chat.py`: a single-turn record is
  one exchange); this rendering serves generation's prompts and `stop_ids`.
- `text` (plain-text pretraining, e.g. the demo's base model): no prompt but BOS, target
  `{output}</s>`, so every token is trained; `instruction` only labels the document and
  `input` is not rendered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from phased_jax.errors import ConfigError
from phased_jax.formats import user_text

TEMPLATES = ("authors", "alpaca", "chat", "text")

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Special:
    """A special token by role; the tokenizer decides its id."""

    role: str  # "bos" | "eos"


BOS, EOS = Special("bos"), Special("eos")
Part = str | Special


def render(instruction: str, input_: str, output: str | None, template: str,
           tokenizer: Any = None) -> tuple[list[Part], list[Part]]:
    """(prompt parts, target parts) of one example; `output=None` renders the prompt only."""
    if template == "authors":
        prompt = [BOS, f"User: {user_text(instruction, input_)}", EOS, "\nAssistant: "]
        return prompt, ([] if output is None else [output, EOS])
    if template == "alpaca":
        fmt = ALPACA_WITH_INPUT if input_ else ALPACA_NO_INPUT
        prompt = [BOS, fmt.format(instruction=instruction, input=input_)]
        return prompt, ([] if output is None else [output, EOS])
    if template == "text":
        return [BOS], ([] if output is None else [output, EOS])
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ConfigError("data.template='chat' needs data.tokenizer with a chat template")
        user = [{"role": "user", "content": user_text(instruction, input_)}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        if output is None:
            return [prompt], []
        full = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": output}], tokenize=False)
        if not full.startswith(prompt):
            raise ConfigError("the tokenizer's chat template does not render the conversation as "
                              "its generation prompt followed by the answer; cannot mask the prompt")
        return [prompt], [full[len(prompt):]]
    raise ConfigError(f"unknown data.template {template!r}; choose one of {TEMPLATES}")


def encode_parts(parts: list[Part], tokenizer: Any) -> list[int]:
    """Token ids of parts (text without added specials; BOS/EOS as the tokenizer's ids)."""
    ids: list[int] = []
    for p in parts:
        if isinstance(p, Special):
            ids.append(special_id(tokenizer, p.role))
        elif p:
            ids += tokenizer(p, add_special_tokens=False)["input_ids"]
    return ids


def special_id(tokenizer: Any, role: str) -> int:
    value = tokenizer.bos_token_id if role == "bos" else tokenizer.eos_token_id
    if value is None:
        raise ConfigError(f"tokenizer has no {role} token; the template needs one")
    return int(value)


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens: the named ones (BOS, EOS, ...) and every added
    token marked special (Llama-3's `<|eot_id|>` and header tokens are only the latter)."""
    ids = set(getattr(tokenizer, "all_special_ids", ()))
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return ids | {int(i) for i, t in added.items() if getattr(t, "special", False)}


def stop_ids(template: str, tokenizer: Any) -> list[int]:
    """The tokens that end an answer at generation: EOS, and the last special token of the
    template's rendered target, the token training put at the end of every answer (EOS for
    `authors`/`alpaca`/`text`; the chat template's end of turn, e.g. Llama-3's `<|eot_id|>`,
    which is not EOS for a base model's tokenizer)."""
    stops = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    if template not in TEMPLATES:
        return stops
    target = encode_parts(render("x", "", "x", template, tokenizer)[1], tokenizer)
    specials = special_ids(tokenizer)
    last = next((t for t in reversed(target) if t in specials), None)
    return stops if last is None or last in stops else [*stops, last]


def encode_prompt(instruction: str, input_: str, template: str, tokenizer: Any) -> list[int]:
    """Prompt ids for generation, exactly as in training."""
    return encode_parts(render(instruction, input_, None, template, tokenizer)[0], tokenizer)
