"""The authors' judge prompt, verbatim (DESIGN.md section 1), and the reply parser."""

from __future__ import annotations

import re

from phased_tools.chat import Messages, ParseError

SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
CRITERIA = (
    "We would like to request your feedback on the performance of two AI assistants in response "
    "to the user question displayed above.\nPlease rate the helpfulness, relevance, accuracy, "
    "level of details of their responses. Each assistant receives an overall score on a scale of "
    "1 to 10, where a higher score indicates better overall performance.\nPlease only output a "
    "single line containing only two values indicating the scores for Assistant 1 and 2, "
    "respectively. The two scores are separated by a space. Do not explain for your scores."
)
USER = (
    "[Question]\n{question}\n\n[The Start of Assistant 1's Answer]\n{answer_1}\n\n"
    "[The End of Assistant 1's Answer]\n\n[The Start of Assistant 2's Answer]\n{answer_2}\n\n"
    "[The End of Assistant 2's Answer]\n\n[System]\n{criteria}\n\n"
)
REASK_TEXT = (
    "Please only output a single line containing only two values indicating the scores for "
    "Assistant 1 and 2, respectively, separated by a space."
)


def question(instruction: str, input_text: str) -> str:
    """`{instruction} Input: {input}` when there is an input, as the authors built it."""
    return f"{instruction} Input: {input_text}" if input_text.strip() else instruction


def judge_messages(q: str, answer_1: str, answer_2: str) -> Messages:
    """System and user messages for one ordered pair."""
    values = {"question": q, "answer_1": answer_1, "answer_2": answer_2, "criteria": CRITERIA}
    # One pass, so text inside an answer is never treated as a placeholder.
    user = re.sub(r"\{(question|answer_1|answer_2|criteria)\}", lambda m: values[m.group(1)], USER)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def parse_pair(reply: str) -> tuple[float, float]:
    """First line -> two scores in [1, 10] ("8 7", "8, 7"), as the authors' parser; else ParseError."""
    line = next((ln.strip() for ln in reply.splitlines() if ln.strip()), "")
    fields = line.replace(",", " ").split()
    if len(fields) != 2:
        raise ParseError(f"first line is not two scores: {line[:80]!r}")
    try:
        a, b = float(fields[0]), float(fields[1])
    except ValueError:
        raise ParseError(f"first line is not two numbers: {line[:80]!r}") from None
    if not (1 <= a <= 10 and 1 <= b <= 10):
        raise ParseError(f"scores outside [1, 10]: {line[:80]!r}")
    return a, b
