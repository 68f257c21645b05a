"""The paper's six test sets: read from local JSONL, or built once from their public sources.

A test-set directory holds one `<test_set>.jsonl` per set (any `*.jsonl`; the file stem names
the set), each line `{"instruction": ..., "input": ..., "id": ...}` (`input` and `id`
optional), or a conversation:
- `{"messages": [{"role", "content"}, ...]}` or ShareGPT's `{"conversations": [{"from",
  "value"}, ...]}` ending with the user turn to answer (earlier answers given, as written);
- MT-Bench's `{"question_id", "category", "turns": [question, ...]}`: the model answers the
  first question, then each next one with its own earlier answers in the conversation.
`build_paper` writes such a directory from the public releases plus a
`manifest.json` of each set's size and source; a directory with a manifest is checked against
it on every load, so a truncated cache is an error rather than a smaller evaluation.

Sources (each overridable, as a hub dataset name, a URL, or a local JSON/JSONL file):
- AlpacaEval's evaluation set (`tatsu-lab/alpaca_eval`, config `alpaca_eval`) carries
  Self-Instruct, OASST, Anthropic helpful (`helpful_base`) and Vicuna in its `dataset` column.
- WizardLM's 218 come from its release (`WizardLM_testset.jsonl`: `idx`, `Instruction`).
- Koala's 180 come from the Koala release (`koala_test_set.jsonl`: `id`, `prompt`);
  AlpacaEval's `koala` subset is a deduplicated 156, so it does not match the paper's count.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from phased_jax.errors import DataError
from phased_jax.fileio import (
    DEFAULT_MAX_RECORD_BYTES,
    BadRecord,
    read_head,
    sniff_binary,
    write_jsonl_atomic,
    write_text_atomic,
)
from phased_jax.formats import (
    MISSING,
    AnswerRow,
    RowError,
    Turn,
    conversation_style,
    conversation_turns,
    file_records,
    list_field,
    looks_like_authors,
    row_fields,
)

# The sizes the paper reports (DESIGN.md section 1); a built set of another size is an error.
EXPECTED_SIZES: dict[str, int] = {
    "self_instruct": 252, "wizardlm": 218, "koala": 180, "vicuna": 80, "oasst": 188,
    "anthropic": 129,
}
ALPACA_EVAL_SOURCE = "tatsu-lab/alpaca_eval"
ALPACA_EVAL_CONFIG = "alpaca_eval"
# The hub repo's data file, for `datasets` versions that no longer run its loading script.
ALPACA_EVAL_FILE = "hf://datasets/tatsu-lab/alpaca_eval/alpaca_eval.json"
WIZARDLM_SOURCE = ("https://raw.githubusercontent.com/nlpxucan/WizardLM/main/WizardLM/data/"
                   "WizardLM_testset.jsonl")
KOALA_SOURCE = "https://raw.githubusercontent.com/arnav-gudibande/koala-test-set/main/koala_test_set.jsonl"
# AlpacaEval's `dataset` values -> our test-set names.
ALPACA_EVAL_SUBSETS = {"selfinstruct": "self_instruct", "oasst": "oasst",
                       "helpful_base": "anthropic", "vicuna": "vicuna", "koala": "koala"}
MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class TestItem:
    """One question of a test set; `where` (file:line) is for error messages only.

    A conversation (`turns`, ending with the user turn to answer) asks one answer per user
    turn it leaves open: after each answer the next of `followups` (MT-Bench's later turns) is
    asked with the model's own answers in the conversation, as a user would chat. Its
    `instruction` is the last question, the one its answer row is judged on."""

    __test__ = False  # not a pytest class

    test_set: str
    id: str
    instruction: str
    input: str = ""
    where: str = ""
    turns: tuple[Turn, ...] = ()  # a conversation up to its first open question; () if single-turn
    followups: tuple[str, ...] = ()  # the questions asked after each answer

    @property
    def rounds(self) -> int:
        """How many answers the item asks for."""
        return 1 + len(self.followups)

    def conversation(self, answers: Sequence[str]) -> tuple[Turn, ...]:
        """The conversation after the model's `answers` so far: ending with the next question,
        or with the last answer once all are answered."""
        turns = list(self.turns)
        for k, answer in enumerate(answers):
            turns.append(Turn("assistant", answer))
            if k < len(self.followups):
                turns.append(Turn("user", self.followups[k]))
        return tuple(turns)

    def record(self) -> dict[str, str]:
        """A single-turn item's line (what `build_paper` writes)."""
        return {"test_set": self.test_set, "id": self.id, "instruction": self.instruction,
                "input": self.input}

    def answer(self, *answers: str) -> AnswerRow:
        """The answer row of the model's `answers`, in order (one per round); the last is its
        `output`, and a conversation's row records the whole conversation."""
        messages = self.conversation(answers) if self.turns else ()
        return AnswerRow(self.test_set, self.id, self.instruction, self.input, answers[-1],
                         messages=messages)


def read_test_set(path: Path, test_set: str | None = None,
                  max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> list[TestItem]:
    """Items of one file in any format training reads (JSONL, an Alpaca JSON list, the authors'
    or `phased-score`'s JSONL, conversations; outputs are ignored) or MT-Bench's questions.
    `test_set` defaults to each row's field, else the file stem; `id` to the row's (MT-Bench's
    `question_id`), else its line (item, in a JSON list) number."""
    path = Path(path)
    if binary := sniff_binary(read_head(path, DataError)):
        raise DataError(f"{path}: {binary.why}")
    items = []
    for line, item, row in file_records(path, max_record_bytes, DataError):
        where = f"{path}:{line}" + (f" (item {item})" if item else "")
        if isinstance(row, BadRecord):
            raise DataError(f"{where}: {row.message}")
        items.append(_item(row, where, test_set, default_id=str(item or line), stem=path.stem))
    return items


def is_mt_bench(row: Any) -> bool:
    """MT-Bench's question shape: `{"question_id", "category", "turns": [question, ...]}`."""
    return (isinstance(row, dict) and "turns" in row and "instruction" not in row
            and conversation_style(row) is None)


def questions(row: Any) -> tuple[tuple[Turn, ...], tuple[str, ...]] | None:
    """(the conversation up to its first open question, the questions asked after each answer)
    of a conversation row; None for a single-turn row; RowError when it is malformed."""
    if style := conversation_style(row):
        name = list_field(style)
        return conversation_turns(row[name], name, style, answered=False), ()
    if not is_mt_bench(row):
        return None
    asked = row["turns"]
    if not (isinstance(asked, list) and asked
            and all(isinstance(q, str) and q.strip() for q in asked)):
        raise RowError("bad_type", "field 'turns' must be a non-empty list of non-empty strings "
                       "(MT-Bench's questions, asked one after another)")
    return (Turn("user", asked[0]),), tuple(asked[1:])


def _conversation_item(row: dict[str, Any], asked: tuple[tuple[Turn, ...], tuple[str, ...]],
                       where: str, test_set: str | None, default_id: str, stem: str) -> TestItem:
    turns, followups = asked
    row_id = row.get("id", row.get("question_id", default_id))
    last = followups[-1] if followups else turns[-1].content
    return TestItem(str(test_set or row.get("test_set") or stem), str(row_id), last, "", where,
                    turns, followups)


def _item(row: Any, where: str, test_set: str | None, default_id: str, stem: str = "") -> TestItem:
    try:
        asked = questions(row)
    except RowError as e:
        raise DataError(f"{where}: {e}") from None
    if asked is not None:
        return _conversation_item(row, asked, where, test_set, default_id, stem)
    if isinstance(row, dict) and not looks_like_authors(row):
        instruction = row.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise DataError(f"{where}: needs a non-empty string field 'instruction' "
                            f"(fields present: {sorted(row)})")
    try:
        fields = row_fields(row, optional=("input", "output"))
    except RowError as e:
        raise DataError(f"{where}: {e}") from None
    if not fields.instruction.strip():
        raise DataError(f"{where}: the instruction is empty")
    row_id = fields.id if fields.id is not MISSING else row.get("id", default_id)
    return TestItem(str(test_set or row.get("test_set") or stem), str(row_id),
                    fields.instruction, fields.input, where)


def load_dir(path: str | Path, names: Iterable[str] | None = None) -> list[TestItem]:
    """Items of every `*.jsonl` in a directory (or only `names`), checked against its manifest."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: test-set directory not found")
    files = sorted(path.glob("*.jsonl"))
    if names is not None:
        wanted = set(names)
        missing = wanted - {f.stem for f in files}
        if missing:
            raise DataError(f"{path}: no {sorted(missing)} (.jsonl); found {[f.stem for f in files]}")
        files = [f for f in files if f.stem in wanted]
    if not files:
        raise DataError(f"{path}: no *.jsonl test sets")
    items = [item for f in files for item in read_test_set(f, test_set=f.stem)]
    manifest = path / MANIFEST
    if manifest.exists():
        sizes = json.loads(manifest.read_text())["sizes"]
        _check_sizes(_count(items), {k: v for k, v in sizes.items()
                                     if k in {f.stem for f in files}}, f"{path} (per {manifest})")
    return items


def check_unique(items: Iterable[TestItem]) -> None:
    """Answers are keyed by (test_set, id) downstream (phased-judge), so a repeat is an error."""
    first: dict[tuple[str, str], str] = {}
    for item in items:
        key = (item.test_set, item.id)
        if key in first:
            raise DataError(f"{item.where}: duplicate (test_set, id) = {key}, first at {first[key]}")
        first[key] = item.where


def _count(items: Iterable[TestItem]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item.test_set] = counts.get(item.test_set, 0) + 1
    return counts


def _check_sizes(counts: Mapping[str, int], expected: Mapping[str, int], what: str) -> None:
    wrong = {k: (counts.get(k, 0), n) for k, n in expected.items() if counts.get(k, 0) != n}
    if wrong:
        detail = ", ".join(f"{k}: {got} items, expected {n}" for k, (got, n) in wrong.items())
        raise DataError(f"{what}: wrong test-set sizes ({detail})")


def _load_rows(source: str, config: str | None = None) -> list[dict[str, Any]]:
    """Rows of a hub dataset, a URL or a local JSON/JSONL file, through `datasets`."""
    import datasets

    is_file = os.path.exists(source) or "://" in source
    try:
        if is_file:
            ds = datasets.load_dataset("json", data_files=source, split="train")
        else:
            loaded = datasets.load_dataset(source, config)
            ds = loaded[next(iter(loaded))] if isinstance(loaded, datasets.DatasetDict) else loaded
    except Exception as e:  # noqa: BLE001 - any loader failure is reported with its source
        raise DataError(f"could not load test-set source {source!r}"
                        f"{f' (config {config!r})' if config else ''}: {e}") from e
    return [dict(r) for r in ds]


def _alpaca_eval_rows(source: str, config: str) -> list[dict[str, Any]]:
    try:
        return _load_rows(source, config)
    except DataError:
        if source != ALPACA_EVAL_SOURCE:
            raise
        return _load_rows(ALPACA_EVAL_FILE)  # the script-free path to the same file


def from_alpaca_eval(rows: list[dict[str, Any]], source: str) -> dict[str, list[TestItem]]:
    """AlpacaEval rows (`instruction`, `dataset`, ...) split into our test sets."""
    sets: dict[str, list[TestItem]] = {}
    for i, row in enumerate(rows):
        name = ALPACA_EVAL_SUBSETS.get(str(row.get("dataset")))
        if name is None:
            continue
        n = len(sets.setdefault(name, []))
        sets[name].append(_item({"instruction": row.get("instruction"), "id": f"{name}-{n}"},
                                f"{source} row {i}", name, ""))
    return sets


def from_rows(rows: list[dict[str, Any]], name: str, source: str, instruction_key: str,
              id_key: str) -> list[TestItem]:
    """A release's own rows (WizardLM: idx/Instruction, Koala: id/prompt) as test items."""
    return [_item({"instruction": r.get(instruction_key), "id": r.get(id_key, i)},
                  f"{source} row {i}", name, "") for i, r in enumerate(rows)]


def build_paper(out_dir: str | Path, *, alpaca_eval_source: str = ALPACA_EVAL_SOURCE,
                alpaca_eval_config: str = ALPACA_EVAL_CONFIG,
                wizardlm_source: str = WIZARDLM_SOURCE, koala_source: str = KOALA_SOURCE,
                expected_sizes: Mapping[str, int] = EXPECTED_SIZES) -> Path:
    """Fetch the six sets, check their sizes, write `<set>.jsonl` and `manifest.json`.

    `koala_source="alpaca_eval"` takes Koala from AlpacaEval instead (a size error unless
    `expected_sizes` allows its count).
    """
    out_dir = Path(out_dir)
    ae = from_alpaca_eval(_alpaca_eval_rows(alpaca_eval_source, alpaca_eval_config),
                          alpaca_eval_source)
    sets = {k: ae.get(k, []) for k in ("self_instruct", "vicuna", "oasst", "anthropic")}
    sets["wizardlm"] = from_rows(_load_rows(wizardlm_source), "wizardlm", wizardlm_source,
                                 "Instruction", "idx")
    sets["koala"] = (ae.get("koala", []) if koala_source == "alpaca_eval" else
                     from_rows(_load_rows(koala_source), "koala", koala_source, "prompt", "id"))
    _check_sizes({k: len(v) for k, v in sets.items()}, expected_sizes,
                 "paper test sets built from their sources")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, items in sets.items():
        write_jsonl_atomic(out_dir / f"{name}.jsonl", (i.record() for i in items))
    sources = {"self_instruct": alpaca_eval_source, "vicuna": alpaca_eval_source,
               "oasst": alpaca_eval_source, "anthropic": alpaca_eval_source,
               "wizardlm": wizardlm_source,
               "koala": alpaca_eval_source if koala_source == "alpaca_eval" else koala_source}
    manifest = {"sizes": {k: len(v) for k, v in sets.items()}, "sources": sources}
    write_text_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return out_dir


def paper_sets(cache_dir: str | Path, **sources: str) -> list[TestItem]:
    """The six sets from `cache_dir`, building the cache first if it is not there."""
    cache_dir = Path(cache_dir)
    if not (cache_dir / MANIFEST).exists():
        build_paper(cache_dir, **sources)
    return load_dir(cache_dir, names=EXPECTED_SIZES)

