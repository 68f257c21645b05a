"""--batch-export / --batch-import: batch files run elsewhere (vLLM's run-batch), answers into the cache.

Export writes the requests the cache cannot answer yet; import stores an output file's answers
under their `custom_id` (the cache key). A reply that does not parse needs a re-ask, which is a
new request: export and import again until export reports nothing to send. Then a normal run
(without these flags) finds everything cached and writes its output without a request.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from phased_jax.fileio import iter_jsonl, write_bytes_atomic
from phased_jax.formats import InputError
from phased_tools.batch import from_cache, store
from phased_tools.batch_api import OutputLine, read_output_line, request_line
from phased_tools.cache import AnswerCache
from phased_tools.chat import FatalError
from phased_tools.client_config import ClientConfig
from phased_tools.jobs import Job, open_cache
from phased_tools.summary import Stats


def exchange_batch_file(prog: str, jobs: Sequence[Job], cfg: ClientConfig) -> int | None:
    """Exit status of --batch-export/--batch-import, or None when neither was given."""
    if cfg.batch_export is None and cfg.batch_import is None:
        return None
    try:
        cache = open_cache(cfg)
        try:
            if cfg.batch_export is not None:
                return export_requests(jobs, cfg, cache, cfg.batch_export)
            assert cfg.batch_import is not None
            return import_answers(jobs, cfg, cache, cfg.batch_import)
        finally:
            cache.close()
    except InputError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except FatalError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{prog}: error: cannot write {e.filename or cfg.batch_export} ({e.strerror})", file=sys.stderr)
        return 1


def export_requests(jobs: Sequence[Job], cfg: ClientConfig, cache: AnswerCache, path: Path) -> int:
    """Write the requests still unanswered as batch input JSONL (no key, no transport in it)."""
    _, pending = from_cache(jobs, cfg, cache)
    write_bytes_atomic(path, b"".join(request_line(k, body) for k, body in pending.items()))
    print(f"wrote {len(pending):,} requests to {path}"
          + (f"; run them (e.g. `vllm run-batch -i {path} -o OUT.jsonl --model {cfg.model}`), then run this "
             "command again with --batch-import OUT.jsonl" if pending else ": every request has an answer"),
          file=sys.stderr)
    return 0


def read_output_file(path: Path) -> dict[str, OutputLine]:
    """Every line of a batch output file by custom_id; a line that is not one is an error at file:line."""
    lines: dict[str, OutputLine] = {}
    for lineno, obj in iter_jsonl(path, InputError):
        try:
            line = read_output_line(obj)
        except ValueError as e:
            raise InputError(f"{path}:{lineno}: {e}; expected OpenAI's batch output format") from None
        if line.key not in lines or line.answer is not None:
            lines[line.key] = line
    return lines


def import_answers(jobs: Sequence[Job], cfg: ClientConfig, cache: AnswerCache, path: Path) -> int:
    """Store the answers of `path` that this command's requests (and their re-asks) need."""
    lines = read_output_file(path)
    stats, fresh, reasons = Stats(), set[str](), dict[str, str]()
    used: set[str] = set()
    while True:  # a stored answer that does not parse makes its re-ask a request: look again
        _, pending = from_cache(jobs, cfg, cache)
        new = [lines[k] for k in pending if k in lines and k not in used]
        if not new:
            break
        used.update(line.key for line in new)
        store(cache, cfg, pending, new, stats, fresh, reasons)
    print(f"stored {stats.answers:,} answers from {path} ({len(reasons):,} lines without an answer, "
          f"{len(lines) - len(used):,} for requests this command does not make); "
          f"{len(pending):,} requests still need an answer"
          + ("; export them with --batch-export" if pending else "; run again without --batch-import"),
          file=sys.stderr)
    return 0
