"""phased-score: difficulty scores (1-5) for instruction data from an OpenAI-compatible model.

Conversations (`messages`, `sharegpt`) are scored by what `--turns` shows the model:
- `first` (default): the paper's prompt (templates/difficulty.txt) applied to the first
  exchange, the first user turn as the instruction and its answer as the response; the system
  turn and later turns are not shown. A one-exchange conversation therefore sends the very
  request (and shares the cache entry) of the Alpaca row with that instruction and output.
- `all`: the paper's prompt adapted to the whole conversation
  (templates/difficulty_conversation.txt): every turn, system included, as `### System:`,
  `### User:` or `### Assistant:` then its text, and the model is asked to rate the whole
  multi-turn task. A single-turn row is shown as a one-exchange conversation (instruction and
  input as the user turn), so a file of either shape can be scored this way.
The cache key is a hash of the request (model, the rendered messages, parameters): what was
shown, and nothing else, decides it, so `--turns all` never reuses a `first` answer.

Output: JSONL, one line per input record in input order, every input field kept plus `score`
(float in [1, 5]), `score_raw` (the reply's first line) and `scorer` ({model, template,
template_sha256}). A `score` already in the input is kept as `score_input`. Items that end
without a score go to `<OUTPUT>.failed.jsonl` with the reason and every raw reply, and the exit
status is 3. Both files are written atomically at the end; answers are cached as they arrive.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from phased_jax.fileio import (
    DEFAULT_MAX_RECORD_BYTES,
    output_problem,
    read_text,
    write_jsonl_atomic,
)
from phased_jax.formats import InputError, Turn
from phased_tools.batch import get_answers
from phased_tools.batch_files import exchange_batch_file
from phased_tools.chat import Messages, ParseError
from phased_tools.client_config import add_client_args, api_key_or_exit, config_from_args
from phased_tools.jobs import Job, JobResult, cached_count
from phased_tools.records import FORMATS, Record, load_records, positive_bytes
from phased_tools.summary import Stats, format_dry_run, format_summary

REASK_TEXT = (
    "Your reply did not start with a line containing only the score. Please answer again: "
    "first a single line containing only a number from 1 to 5, then your explanation."
)
_PLACEHOLDER = re.compile(r"\{(instruction|input|output|input_block|conversation)\}")
TURNS = ("first", "all")
# --turns -> the packaged template, and the placeholders a template for it must hold
_PACKAGED = {"first": "difficulty", "all": "difficulty_conversation"}
_NEEDS = {"first": ("{instruction}", "{output}"), "all": ("{conversation}",)}
_LABEL = {"system": "System", "user": "User", "assistant": "Assistant"}
_SCORE_RE = re.compile(
    r"^(?:score\s*[:=]?\s*)?([0-9]+(?:\.[0-9]+)?)\s*(?:/\s*5(?:\.0+)?)?\.?$", re.IGNORECASE
)


@dataclass(frozen=True)
class Template:
    """A difficulty prompt: system text and a user text with {instruction}/{input}/{output}
    (the first exchange) or {conversation} (every turn)."""

    name: str
    system: str
    user: str
    sha256: str

    def render(self, rec: Record) -> Messages:
        values = {
            "instruction": rec.instruction,
            "input": rec.input,
            "output": rec.output,
            "input_block": f"### Input:\n{rec.input}\n\n" if rec.input.strip() else "",
            "conversation": render_conversation(rec.turns) if "{conversation}" in self.user else "",
        }
        # One pass, so braces inside the data are never substituted again.
        user = _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.user)
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": user}]


def render_conversation(turns: tuple[Turn, ...]) -> str:
    """Every turn as `### User:` (System, Assistant) on a line of its own, then its text; turns
    apart by a blank line, as the paper's prompt sets its instruction and response apart."""
    return "\n\n".join(f"### {_LABEL[t.role]}:\n{t.content}" for t in turns)


def load_template(path: str | Path | None = None, turns: str = "first") -> Template:
    """The packaged template for `turns`, or a user's file with [system]/[user] sections.

    What a template shows must be what `--turns` says: a `first` template shows the first
    exchange ({instruction}, {output}) and not {conversation}; an `all` one shows {conversation}.
    """
    if path is None:
        name = _PACKAGED[turns]
        text = resources.files("phased_tools").joinpath(f"templates/{name}.txt").read_text("utf-8")
    else:
        path = Path(path)
        text = read_text(path, InputError)
        name = path.stem
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for line in text.splitlines():
        head = line.strip().lower()
        if head in ("[system]", "[user]"):
            current = head[1:-1]
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
        elif line.strip() and not line.lstrip().startswith("#"):
            raise InputError(f"{path or name}: text before the first [system] or [user] section: {line[:60]!r}")
    if "user" not in sections:
        raise InputError(f"{path or name}: a template needs a [user] section (and optionally [system])")
    user = "\n".join(sections["user"]).strip("\n")
    if turns == "first" and "{conversation}" in user:
        raise InputError(f"{path or name}: a template with {{conversation}} shows every turn; "
                         "pass --turns all")
    if any(p not in user for p in _NEEDS[turns]):
        raise InputError(f"{path or name}: with --turns {turns} the [user] section must contain "
                         + " and ".join(_NEEDS[turns]))
    return Template(
        name=name,
        system="\n".join(sections.get("system", [])).strip("\n"),
        user=user,
        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest()[:12],
    )


def first_line(reply: str) -> str:
    """The reply's first non-empty line, stripped (this is `score_raw`)."""
    for line in reply.splitlines():
        if line.strip():
            return line.strip()
    return ""


def parse_score(reply: str) -> float:
    """First line -> a number in [1, 5] ("4", "3.5", "Score: 4", "**4**", "4/5"); else ParseError."""
    line = first_line(reply)
    m = _SCORE_RE.match(line.replace("*", "").strip())
    if not m:
        raise ParseError(f"first line is not a score: {line[:80]!r}")
    value = float(m.group(1))
    if not 1.0 <= value <= 5.0:
        raise ParseError(f"score {value:g} outside [1, 5]")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="phased-score",
        description="Rate the difficulty (1-5) of instruction data, single-turn rows or "
        "conversations, with GPT-4 or any OpenAI-compatible model, as Phased IFT does. Answers are cached as they arrive, so an "
        "interrupted run resumes without paying twice.",
        epilog="Exit status: 0 all scored, 3 some items failed (see OUTPUT.failed.jsonl), "
        "1 a fatal error (authentication, unknown model, server unreachable: nothing is written), "
        "2 bad arguments or input.",
    )
    p.add_argument("input", type=Path, help="Alpaca JSON, the authors' JSONL, JSONL, or conversations "
                   "(OpenAI-style messages or ShareGPT, JSONL or a JSON list; one shape a file)")
    p.add_argument("-o", "--output", type=Path, required=True, help="scored JSONL to write")
    p.add_argument("--format", choices=FORMATS, default="auto", help="input format (default: %(default)s)")
    p.add_argument("--instruction-field", default="instruction", help="JSONL field (default: %(default)s)")
    p.add_argument("--input-field", default="input", help="JSONL field (default: %(default)s)")
    p.add_argument("--output-field", default="output", help="JSONL field (default: %(default)s)")
    p.add_argument("--messages-field", default="messages",
                   help="list field of OpenAI-style conversations (default: %(default)s)")
    p.add_argument("--conversations-field", default="conversations",
                   help="list field of ShareGPT conversations (default: %(default)s)")
    p.add_argument("--turns", choices=TURNS, default="first",
                   help="what a conversation shows the model: 'first', the paper's prompt on the "
                   "first user turn and its answer (system and later turns not shown); 'all', "
                   "every turn, with the prompt adapted to rate the whole multi-turn task "
                   "(templates/difficulty_conversation.txt); a single-turn row is then one "
                   "exchange. Each has its own cache entries (default: %(default)s)")
    p.add_argument("--template", type=Path, default=None,
                   help="prompt template file (default: the packaged difficulty.txt, or "
                   "difficulty_conversation.txt with --turns all)")
    p.add_argument("--failed", type=Path, default=None, help="where failed items go (default: OUTPUT.failed.jsonl)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N records")
    p.add_argument("--max-record-bytes", type=positive_bytes, default=DEFAULT_MAX_RECORD_BYTES,
                   help="refuse an input record longer than this (default: %(default)s)")
    add_client_args(p, reask_default=2)
    return p


def _output_row(rec: Record, score: float, raw: str, scorer: dict[str, str]) -> dict[str, Any]:
    row = dict(rec.raw)
    if "score" in row:
        row["score_input"] = row.pop("score")
    row.update(score=score, score_raw=raw, scorer=scorer)
    return row


def _note_unshown_turns(records: list[Record]) -> None:
    """Say on stderr how many conversations go on past the first exchange that `first` shows,
    so that a user who meant to rate whole conversations learns of --turns all before paying."""
    longer = sum(1 for r in records if sum(t.role != "system" for t in r.messages) > 2)
    if longer:
        print(f"phased-score: note: {longer} of {len(records)} conversation(s) go on past their "
              "first exchange; only that exchange is scored (--turns all shows every turn)",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `phased-score`."""
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    try:
        template = load_template(args.template, args.turns)
        records, report = load_records(
            args.input,
            args.format,
            instruction_field=args.instruction_field,
            input_field=args.input_field,
            output_field=args.output_field,
            messages_field=args.messages_field,
            conversations_field=args.conversations_field,
            max_record_bytes=args.max_record_bytes,
        )
    except InputError as e:
        print(f"phased-score: error: {e}", file=sys.stderr)
        return 2
    if args.limit is not None:
        records = records[: args.limit]
    if report.empty_output_lines:
        lines = report.empty_output_lines
        print(
            f"phased-score: warning: {len(lines)} record(s) with an empty output in {args.input} "
            f"(lines {', '.join(map(str, lines[:20]))}{', ...' if len(lines) > 20 else ''}); "
            "they are scored and kept, but the phase pipeline rejects empty outputs",
            file=sys.stderr,
        )
    if args.turns == "first":
        _note_unshown_turns(records)
    messages = [template.render(r) for r in records]
    if args.dry_run:
        print(format_dry_run(len(records), messages, cached_count(cfg, messages), cfg,
                             f"records from {args.input} ({report.format}"
                             + (", --turns all)" if args.turns == "all" else ")")))
        return 0
    jobs = [Job(m, parse_score, REASK_TEXT) for m in messages]
    if (status := exchange_batch_file("phased-score", jobs, cfg)) is not None:
        return status
    failed_path = args.failed or args.output.with_name(args.output.name + ".failed.jsonl")
    for flag, path in (("-o", args.output), ("--failed", failed_path)):
        problem = output_problem(path)
        if problem:  # before the first request: a run must never pay for answers it cannot write
            print(f"phased-score: error: {flag}: {problem}", file=sys.stderr)
            return 2
    api_key = api_key_or_exit(cfg)
    scorer = {"model": cfg.model, "template": template.name, "template_sha256": template.sha256}
    done = get_answers("phased-score", "scoring", jobs, cfg, api_key)
    if isinstance(done, int):
        return done
    return _finish(args, failed_path, records, done.results, scorer, done.stats, cfg, done.wall)


def _finish(args: argparse.Namespace, failed_path: Path, records: list[Record], results: list[JobResult],
            scorer: dict[str, str], stats: Stats, cfg: Any, wall: float) -> int:
    out_rows, failed_rows = [], []
    for rec, res in zip(records, results, strict=True):
        if res.ok:
            out_rows.append(_output_row(rec, res.value, first_line(res.replies[-1]), scorer))
        else:
            failed_rows.append(
                {
                    "line": rec.line,
                    "id": rec.raw.get("id"),
                    "error": res.error,
                    "score_raw": first_line(res.replies[-1]) if res.replies else None,
                    "replies": res.replies,
                    "scorer": scorer,
                    "record": rec.raw,
                }
            )
    try:
        write_jsonl_atomic(args.output, out_rows)
        if failed_rows:
            write_jsonl_atomic(failed_path, failed_rows)
        elif failed_path.exists():
            failed_path.unlink()  # stale from an earlier run
    except OSError as e:
        print(f"phased-score: error: cannot write {e.filename or args.output} ({e.strerror}); every answer "
              "is cached, so fix that and run again: nothing is sent twice", file=sys.stderr)
        return 1
    cached = sum(1 for r in results if r.ok and r.from_cache)
    counts = {"scored": len(out_rows), "failed": len(failed_rows), "cached": cached}
    print(format_summary(stats, cfg, counts, wall), file=sys.stderr)
    print(f"wrote {args.output}" + (f" and {failed_path}" if failed_rows else ""), file=sys.stderr)
    if failed_rows:
        for row in failed_rows[:5]:
            print(f"  failed: line {row['line']}: {row['error']}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
