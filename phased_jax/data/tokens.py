"""Records -> token ids with a loss mask; rows of one or several packed examples; a disk cache.

A single-turn example is `prompt_ids + target_ids` (BOS/EOS as real ids, see templates.py),
its target tokens trained. It is cut at the end to `max_length` (counted as truncated); an
example whose prompt alone fills `max_length` would train nothing, so it is left out and
listed in the report. Under the `chat` template every record is a conversation (a single-turn
record is one exchange), rendered and masked by `chat.py`: every assistant turn trained, whole
trailing turns dropped to fit (counted as truncated), a conversation whose first answer does not
fit left out and listed.

Row layout (the contract with the train step), every array int32 [rows, max_length]:
- `input_ids`: the tokens; padding is `pad_id`.
- `targets`: the next token of the same example (shifted left within it), so the loss needs no
  slicing of logits; `pad_id` at each example's last token and at padding.
- `loss_mask`: 1 where `targets` is a response token (the output and its final EOS; every
  assistant turn and its end-of-turn token), else 0.
- `segment_ids`: 1, 2, ... per example in the row, 0 at padding.
- `positions`: 0, 1, ... restarting at every example, 0 at padding.
With the model's mask (same non-zero segment, earlier position) no attention crosses
examples, so a packed example's loss equals its loss alone in a row.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phased_jax.data.chat import fit, tokenize_conversations
from phased_jax.data.records import Record, hash_records
from phased_jax.data.templates import Special, render, special_id
from phased_jax.errors import ConfigError, DataError
from phased_jax.fileio import write_bytes_atomic

CACHE_VERSION = "tokens-v2"  # bump when the layout or the rules above change
BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


def random_batch(rows: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A full batch of random tokens (ids >= 3, past the special ones), every one a target:
    the same arrays for both sides of a speed comparison (`benchmarks/`)."""
    ids = np.random.RandomState(seed).randint(3, vocab, (rows, seq + 1)).astype(np.int32)
    return dict(input_ids=ids[:, :-1], targets=ids[:, 1:], loss_mask=np.ones((rows, seq), np.int32),
                segment_ids=np.ones((rows, seq), np.int32),
                positions=np.tile(np.arange(seq, dtype=np.int32), (rows, 1)))


@dataclass
class TokenReport:
    """What tokenisation changed: truncated examples (kept) and skipped ones (left out)."""

    truncated: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    turns_dropped: int = 0  # assistant turns of conversations cut to fit max_length

    def to_dict(self) -> dict[str, Any]:
        return {"truncated": self.truncated, "turns_dropped": self.turns_dropped,
                "skipped": len(self.skipped), "records": self.skipped}


@dataclass
class TokenizedExamples:
    """All examples' ids in one flat array; example i is ids[offsets[i]:offsets[i+1]]."""

    ids: np.ndarray  # int32 [total tokens]
    offsets: np.ndarray  # int64 [N + 1]
    trained: np.ndarray  # bool [total tokens]: the token is a target carrying loss
    record_ids: np.ndarray  # str [N]
    max_length: int
    pad_id: int

    def __len__(self) -> int:
        return len(self.record_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def trained_counts(self) -> np.ndarray:
        """Tokens carrying loss in each example, int64 [N]."""
        c = np.concatenate([[0], np.cumsum(self.trained, dtype=np.int64)])
        return c[self.offsets[1:]] - c[self.offsets[:-1]]

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, trained) of example i."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.trained[a:b]

    @classmethod
    def of(cls, examples: Sequence[tuple[np.ndarray, np.ndarray]], record_ids: Sequence[str],
           max_length: int, pad_id: int) -> TokenizedExamples:
        """Examples (ids, trained) concatenated."""
        lengths = np.array([len(ids) for ids, _ in examples], np.int64)
        flat = (lambda k, dt: np.concatenate([e[k] for e in examples]).astype(dt)
                if examples else np.zeros(0, dt))
        return cls(flat(0, np.int32), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                   flat(1, bool), np.asarray(record_ids, dtype=str), max_length, pad_id)

    def select(self, record_ids: Sequence[str]) -> TokenizedExamples:
        """The examples of these records, in this order; records skipped at tokenisation are absent."""
        index = {r: i for i, r in enumerate(self.record_ids.tolist())}
        keep = [index[r] for r in record_ids if r in index]
        return TokenizedExamples.of([self.example(i) for i in keep], self.record_ids[keep],
                                    self.max_length, self.pad_id)


def pad_id_of(tokenizer: Any) -> int:
    """The pad id: the tokenizer's, else `<unk>`'s (Llama-2's convention, id 0), else EOS's
    (Llama-3 has neither pad nor unk; its id 0 is the text "!"), else 0. Padding is masked
    from attention and loss, so the choice only needs to be a real token id."""
    for value in (tokenizer.pad_token_id, getattr(tokenizer, "unk_token_id", None),
                  tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def load_tokenizer(path: str, setting: str = "data.tokenizer") -> Any:
    """A Hugging Face tokenizer from a local directory (no network); `setting` names where the
    path came from (a config field, a flag), for the error."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ConfigError(f"{setting} {path!r}: cannot load a tokenizer ({e})") from e


def tokenize(records: Sequence[Record], template: str, tokenizer: Any, max_length: int
             ) -> tuple[TokenizedExamples, TokenReport]:
    """Tokenise every record (one batched tokenizer call over distinct texts)."""
    if max_length < 2:
        raise ConfigError(f"data.max_length must be >= 2, not {max_length}")
    if template == "chat":
        return _tokenize_chat(records, tokenizer, max_length)
    talk = next((r for r in records if r.messages), None)
    if talk is not None:
        raise ConfigError(f"{talk.source} is a conversation, which data.template={template!r} "
                          "cannot render; set data.template=chat and data.tokenizer to a "
                          "tokenizer with a chat template")
    rendered = [render(r.instruction, r.input, r.output, template, tokenizer) for r in records]
    texts = sorted({p for pr, tg in rendered for p in (*pr, *tg) if isinstance(p, str) and p})
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    ids_of = dict(zip(texts, encoded, strict=True))
    specials = {"bos": None, "eos": None}

    def encode(parts) -> list[int]:
        out: list[int] = []
        for p in parts:
            if isinstance(p, Special):
                if specials[p.role] is None:
                    specials[p.role] = special_id(tokenizer, p.role)
                out.append(specials[p.role])
            elif p:
                out += ids_of[p]
        return out

    report = TokenReport()
    kept, rids = [], []
    for rec, (prompt, target) in zip(records, rendered, strict=True):
        p_ids, t_ids = encode(prompt), encode(target)
        if len(p_ids) >= max_length:
            report.skipped.append({"source": rec.source, "id": rec.id,
                                   "reason": "prompt_fills_max_length",
                                   "message": f"prompt has {len(p_ids)} tokens >= max_length "
                                              f"{max_length}: no target token would be trained"})
            continue
        full = np.asarray(p_ids + t_ids, np.int32)
        if len(full) > max_length:
            report.truncated += 1
            full = full[:max_length]
        trained = np.arange(len(full)) >= len(p_ids)
        kept.append((full, trained))
        rids.append(rec.id)
    return TokenizedExamples.of(kept, rids, max_length, pad_id_of(tokenizer)), report


def _tokenize_chat(records: Sequence[Record], tokenizer: Any, max_length: int
                   ) -> tuple[TokenizedExamples, TokenReport]:
    report = TokenReport()
    kept, rids = [], []
    chats = tokenize_conversations([r.turns for r in records], tokenizer,
                                   [r.source for r in records])
    for rec, ex in zip(records, chats, strict=True):
        cut = fit(ex, max_length)
        if cut is None:
            a, b = ex.answers[0]
            report.skipped.append({"source": rec.source, "id": rec.id,
                                   "reason": "first_answer_exceeds_max_length",
                                   "message": f"the first answer ends at token {b} > max_length "
                                              f"{max_length}: no whole answer would be trained"})
            continue
        if cut is not ex:
            report.truncated += 1
            report.turns_dropped += len(ex.answers) - len(cut.answers)
        kept.append((cut.ids, cut.trained))
        rids.append(rec.id)
    return TokenizedExamples.of(kept, rids, max_length, pad_id_of(tokenizer)), report


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about the tokenizer that changes ids."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else
             json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(str((tokenizer.bos_token_id, tokenizer.eos_token_id, pad_id_of(tokenizer))).encode())
    return h.hexdigest()


def cache_key(records: Sequence[Record], template: str, tokenizer: Any, max_length: int) -> str:
    """Hash of the records' content, the template, the tokenizer and max_length."""
    h = hashlib.sha256(f"{CACHE_VERSION}\0{template}\0{max_length}\0".encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    hash_records(h, records)
    return h.hexdigest()[:24]


def _save_atomic(path: Path, examples: TokenizedExamples, report: TokenReport) -> None:
    buf = io.BytesIO()
    np.savez(buf, ids=examples.ids, offsets=examples.offsets, trained=examples.trained,
             record_ids=examples.record_ids,
             meta=np.array(json.dumps({"max_length": examples.max_length,
                                       "pad_id": examples.pad_id, "report": report.to_dict()})))
    write_bytes_atomic(path, buf.getvalue())  # a crash leaves the old file or none


def _load(path: Path) -> tuple[TokenizedExamples, TokenReport]:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        examples = TokenizedExamples(z["ids"], z["offsets"], z["trained"], z["record_ids"],
                                     meta["max_length"], meta["pad_id"])
    rep = meta["report"]
    return examples, TokenReport(rep["truncated"], rep["records"], rep["turns_dropped"])


def tokenize_cached(records: Sequence[Record], template: str, tokenizer: Any, max_length: int,
                    cache_dir: str | Path | None) -> tuple[TokenizedExamples, TokenReport, Path | None]:
    """`tokenize`, reusing `<cache_dir>/tokens-<key>.npz` when present; returns its path too."""
    if not cache_dir:
        return (*tokenize(records, template, tokenizer, max_length), None)
    path = Path(cache_dir) / f"tokens-{cache_key(records, template, tokenizer, max_length)}.npz"
    if path.exists():
        try:
            return (*_load(path), path)
        except (OSError, ValueError, KeyError) as e:  # unreadable: redo it, never trust it
            print(f"phased-jax: token cache {path} unreadable ({e}); tokenising again")
    examples, report = tokenize(records, template, tokenizer, max_length)
    _save_atomic(path, examples, report)
    return examples, report, path


def pack(lengths_in_order: np.ndarray, max_length: int) -> np.ndarray:
    """Row boundaries [R + 1] over examples taken in order, next-fit, so packing keeps the order.

    Row r holds the examples at order positions offsets[r]:offsets[r + 1].
    """
    offsets, used = [0], 0
    for k, n in enumerate(lengths_in_order.tolist()):
        if used and used + n > max_length:
            offsets.append(k)
            used = 0
        used += n
    if len(lengths_in_order):
        offsets.append(len(lengths_in_order))
    return np.asarray(offsets, np.int64)


def build_rows(examples: TokenizedExamples, rows: Sequence[np.ndarray | None]) -> dict[str, np.ndarray]:
    """Arrays [len(rows), max_length] in the layout of the module docstring; None = an empty row."""
    R, L, pad = len(rows), examples.max_length, examples.pad_id
    out = {k: np.zeros((R, L), np.int32) for k in BATCH_KEYS}
    out["input_ids"][:] = pad
    out["targets"][:] = pad
    for r, row in enumerate(rows):
        if row is None:
            continue
        c = 0
        for seg, i in enumerate(row.tolist(), 1):
            ids, trained = examples.example(i)
            n = len(ids)
            if c + n > L:
                raise DataError(f"row {r} overflows max_length {L} (packing bug)")
            out["input_ids"][r, c:c + n] = ids
            out["targets"][r, c:c + n - 1] = ids[1:]
            out["loss_mask"][r, c:c + n - 1] = trained[1:]
            out["segment_ids"][r, c:c + n] = seg
            out["positions"][r, c:c + n] = np.arange(n, dtype=np.int32)
            c += n
    return out
