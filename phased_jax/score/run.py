"""`phased-jax score`: difficulty from the base model, in `phased-score`'s output format.

    phased-jax score --config configs/X.py --method ifd --output scored.jsonl

Reads the experiment config: the records (`data.paths`, `data.format`, `data.fields`), the
template and `data.max_length` (the examples exactly as training builds them), the tokenizer
(`data.tokenizer`, default the model directory), the base model (`model.init_from`: an HF
directory or a params checkpoint; `model.dtype`/`param_dtype` its precision) and the mesh.

- `--method loss`: the answer's mean token loss given the instruction (training's loss).
- `--method ifd`: that loss divided by the answer's mean loss alone (`BOS + answer`), as in
  Cherry LLM (Li et al. 2024); higher = the instruction helps less = harder. See `losses.py`.

Output: each input row whole, plus `score` (1-5, by rank: see `scale.py`), `score_raw` (the loss
or IFD) and `scorer` ({method, model, template, max_length, map}); an input `score` is kept as
`score_input`. `data.format=scored` (or auto) reads it. Records whose prompt fills
`data.max_length` have no answer token to score: they go to `<OUTPUT>.failed.jsonl` and the exit
status is 3, as with `phased-score`. Work is saved by chunk of records in `<OUTPUT>.chunks/`
(each file written whole); a rerun with the same data and settings skips finished chunks.
Delete that folder once the output is final.

On several processes (`--distributed` on a pod, `--local-pod N` here) every process computes
every chunk together (the batch is split over all devices; the losses come back replicated)
and only process 0 writes: the output is the same bytes as one process's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from phased_jax import distributed
from phased_jax.config import get_default_config
from phased_jax.config_cli import add_config_help, parse_config_argv, split_config_argv
from phased_jax.data.records import Record, hash_records, read_config_records
from phased_jax.data.tokens import load_tokenizer, tokenize, tokenizer_fingerprint
from phased_jax.errors import ConfigError, DataError
from phased_jax.fileio import output_problem, write_jsonl_atomic, write_text_atomic
from phased_jax.generate.run import load_model
from phased_jax.local_paths import check_score
from phased_jax.score.losses import answers_alone, make_forward, mean_losses
from phased_jax.score.rows import input_rows
from phased_jax.score.scale import MAPS, to_scores
from phased_jax.sharding import Placement

log = logging.getLogger(__name__)
USAGE = "usage: phased-jax score --config FILE [--config.SECTION.FIELD=VALUE ...] --method ifd|loss --output FILE"
METHODS = ("ifd", "loss")
CHUNK_VERSION = "score-chunks-v1"
SCORE_COMMAND = (sys.executable, "-m", "phased_jax.cli", "score")  # a local pod's workers
LAUNCHER_FLAGS = ("--local-pod", "--local-devices")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phased-jax score", description=__doc__.split("\n")[0],
                                epilog="The experiment config comes as in `phased-jax train`: "
                                       "--config FILE and --config.SECTION.FIELD=VALUE overrides.")
    add_config_help(p, "--config.model.init_from=DIR")
    p.add_argument("--method", choices=METHODS, required=True,
                   help="ifd: loss with instruction / loss without; loss: loss with instruction")
    p.add_argument("--output", required=True, metavar="FILE")
    p.add_argument("--map", choices=MAPS, default="paper",
                   help="raw value -> 1-5 by rank (paper: the paper's stage shares at the "
                        "default thresholds; linear: 1 + 4 * quantile)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    p.add_argument("--chunk-size", type=int, default=1024, help="records per saved chunk")
    p.add_argument("--length-multiple", type=int, default=64,
                   help="row lengths are padded to a multiple of this (fewer compiles)")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() (multi-host pods)")
    p.add_argument("--local-pod", type=int, default=0, metavar="N",
                   help="run as N local CPU processes joined by jax.distributed (tests a pod)")
    p.add_argument("--local-devices", type=int, default=4, metavar="D",
                   help="fake CPU devices per local process (default 4)")
    return p


def chunk_key(records: Sequence[Record], settings: str) -> str:
    """Hash of a chunk's records and every setting that changes their losses."""
    h = hashlib.sha256(f"{CHUNK_VERSION}\0{settings}\0".encode())
    hash_records(h, records)
    return h.hexdigest()[:20]


class Scorer:
    """The model, tokenizer and compiled forward pass: losses of a chunk of records."""

    def __init__(self, config: Any, method: str, args: argparse.Namespace):
        model_dir = config.model.init_from
        self.method, self.args, self.config = method, args, config
        self.tokenizer = load_tokenizer(config.data.tokenizer or model_dir,
                                        "data.tokenizer" if config.data.tokenizer
                                        else "data.tokenizer (default: model.init_from)")
        self.placement = Placement.from_config(config.mesh)
        self.model, self.params = load_model(
            model_dir, self.placement, (config.model.dtype, config.model.param_dtype),
            hf=Path(model_dir, "config.json").is_file())
        self.forward = make_forward(self.model, self.placement)

    def settings(self) -> str:
        c = self.config
        return json.dumps([self.method, str(Path(c.model.init_from).resolve()), c.model.dtype,
                           c.model.param_dtype, c.data.template, c.data.max_length,
                           tokenizer_fingerprint(self.tokenizer)])

    def chunk(self, records: Sequence[Record]) -> dict[str, Any]:
        """{record id: [loss, loss alone or None]}; a record with no answer token is absent."""
        examples, _ = tokenize(records, self.config.data.template, self.tokenizer,
                               int(self.config.data.max_length))
        a = self.args
        given = mean_losses(self.forward, self.params, examples, self.placement,
                            a.batch_size, a.length_multiple)
        alone = np.full(len(examples), np.nan)
        if self.method == "ifd":
            answers, groups = answers_alone(examples, self.tokenizer)
            alone = mean_losses(self.forward, self.params, answers, self.placement,
                                a.batch_size, a.length_multiple, groups)
        return {rid: [float(g), None if np.isnan(x) else float(x)]
                for rid, g, x in zip(examples.record_ids.tolist(), given, alone, strict=True)
                if not np.isnan(g)}


def load_chunk(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())["losses"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or unreadable: computed again, never trusted


def score_chunks(records: Sequence[Record], scorer: Scorer, work_dir: Path,
                 chunk_size: int) -> dict[str, Any]:
    """Losses of every record, chunk by chunk, each chunk saved whole before the next."""
    settings = scorer.settings()
    work_dir.mkdir(parents=True, exist_ok=True)
    n_chunks = -(-len(records) // chunk_size)
    losses: dict[str, Any] = {}
    done = computed = 0
    t0 = time.perf_counter()
    for k in range(n_chunks):
        part = records[k * chunk_size:(k + 1) * chunk_size]
        path = work_dir / f"chunk-{k:06d}-{chunk_key(part, settings)}.json"
        got = load_chunk(path)
        status = "done before"
        if got is None:
            got = scorer.chunk(part)
            if jax.process_index() == 0:
                write_text_atomic(path, json.dumps({"settings": settings, "losses": got}))
            computed += len(part)
            status = "computed"
        else:
            done += 1
        losses.update(got)
        log.info("chunk %d/%d %s (%d records; %.1f examples/s this run, compiles included)",
                 k + 1, n_chunks, status, len(part),
                 computed / max(time.perf_counter() - t0, 1e-9))
    log.info("chunks: %d done before, %d records computed, in %s", done, computed, work_dir)
    return losses


def raw_values(records: Sequence[Record], losses: dict[str, Any], method: str
               ) -> tuple[list[Record], list[float], list[Record]]:
    """(scored records, their raw values, records that could not be scored)."""
    scored, raw, failed = [], [], []
    for r in records:
        pair = losses.get(r.id)
        if pair is None or (method == "ifd" and not pair[1]):
            failed.append(r)
            continue
        scored.append(r)
        raw.append(pair[0] / pair[1] if method == "ifd" else pair[0])
    return scored, raw, failed


def main(argv: list[str] | None = None,
         worker_command: Sequence[str] = SCORE_COMMAND) -> int:
    """The `score` subcommand; a local pod's workers run `worker_command` (the tests' hooks)."""
    argv = list(argv or [])
    config_argv, rest = split_config_argv(argv)
    args = parser().parse_args(rest)
    for name in ("batch_size", "chunk_size", "length_multiple", "local_devices"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    config = parse_config_argv(config_argv, "phased-jax score", USAGE, default=get_default_config,
                               sections=("model", "data")).config
    if not config.model.init_from:
        raise ConfigError("model.init_from is empty: set it to the base model (an HF directory "
                          "or a params checkpoint), e.g. --config.model.init_from=DIR")
    check_score(config, args.output)  # inputs, outputs and the Hub: before any data is read
    problem = output_problem(args.output)
    if problem:
        raise ConfigError(f"--output {args.output}: {problem}")
    if args.local_pod > 0:
        return distributed.launch_local_pod(
            args.local_pod, [*worker_command, *distributed.without_flags(argv, LAUNCHER_FLAGS)],
            args.local_devices, name="phased-jax score")
    distributed.initialize(auto=args.distributed)
    logging.basicConfig(format="%(message)s")  # if nothing set up logging before
    # Our progress lines: process 0 reports for all (the root logger stays at WARNING).
    log.setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)
    records, invalid = read_config_records(config.data)
    log.info("%s", invalid.summary())
    scorer = Scorer(config, args.method, args)
    work_dir = Path(f"{args.output}.chunks")
    losses = score_chunks(records, scorer, work_dir, args.chunk_size)
    scored, raw, failed = raw_values(records, losses, args.method)
    if not scored:
        raise DataError(f"no record could be scored (every prompt fills data.max_length="
                        f"{config.data.max_length}?)")
    scorer_info = {"method": args.method, "model": config.model.init_from,
                   "template": config.data.template, "max_length": int(config.data.max_length),
                   "map": args.map}
    rows = input_rows(scored, int(config.data.max_record_bytes))
    for row, score, value in zip(rows, to_scores(raw, args.map), raw, strict=True):
        if "score" in row:
            row["score_input"] = row.pop("score")
        row.update(score=float(score), score_raw=float(value), scorer=scorer_info)
    if jax.process_index() == 0:
        write_jsonl_atomic(args.output, rows)
        failed_path = Path(f"{args.output}.failed.jsonl")
        if failed:
            write_jsonl_atomic(failed_path, [
                {"id": r.id, "source": r.source, "reason": "no_answer_tokens",
                 "message": f"the prompt fills data.max_length={config.data.max_length}"}
                for r in failed])
        elif failed_path.exists():
            failed_path.unlink()  # from an earlier run of this output
    log.info("wrote %d scored records to %s (raw %s: min %.4g, median %.4g, max %.4g)%s",
             len(rows), args.output, args.method, min(raw), float(np.median(raw)), max(raw),
             f"; {len(failed)} unscored in {args.output}.failed.jsonl" if failed else "")
    return 3 if failed else 0
