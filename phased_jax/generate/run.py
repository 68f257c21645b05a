"""`phased-jax generate`: answers to test sets in the JSONL format `phased-judge` reads.

    phased-jax generate --config configs/X.py --hf DIR --test-sets paper --output answers.jsonl
    phased-jax generate --checkpoint DIR --tokenizer TOK --input test.jsonl --output answers.jsonl
    phased-jax generate --run runs/X --test-sets paper --output answers/X/
    phased-jax generate --hf BASE --adapter ADAPTER --input test.jsonl --output answers.jsonl

`--run` answers with every model a training run wrote (`phases/phase<k>-<name>/` in phase
order, then `hf/`), in one process: the tokenizer and questions are read once and the compiled
decoder is reused by every model of the same shapes; one file per model in the --output folder.

LoRA: `--adapter DIR` answers with the base (--hf or --checkpoint) and a PEFT adapter on it,
unmerged (the adapters sharded with the mesh as the weights they adapt). A LoRA run's phases
are such adapters; `--run` puts each on the base (adapter_config.json's
base_model_name_or_path, i.e. the run's model.init_from, or `--base DIR`), read once for all.

Each output line is `{test_set, id, instruction, input, output, generator}`, in input order,
written atomically. Decoding is greedy with a total length of 1024 by default (the paper's
setting) and uses the training template, so answers are what the trained model would say.

Conversations (`--config.data.template=chat`, a tokenizer with a chat template): a
messages/ShareGPT row ending with a user turn gets an answer to that turn; MT-Bench's
`{"question_id", "turns": [q1, q2, ...]}` is answered turn by turn, q2 asked after the model's
own answer to q1. Every item's first question is asked in batches, then every second one, and
so on. A conversation's line adds `messages`, the whole conversation with the model's answers;
its `instruction` is the last question and `output` the last answer (what the judge reads).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from phased_jax import local_paths, params_checkpoint
from phased_jax.config import get_default_config
from phased_jax.config_cli import add_config_help, parse_config_argv, split_config_argv
from phased_jax.data.chat import TemplateRefused, chat_template, encode_chat_prompt
from phased_jax.data.templates import TEMPLATES, encode_prompt, stop_ids
from phased_jax.data.tokens import load_tokenizer, pad_id_of
from phased_jax.errors import ConfigError, DataError, UsageError
from phased_jax.fileio import write_jsonl_atomic
from phased_jax.generate import testsets
from phased_jax.generate.decode import Sampling, generate_ids
from phased_jax.hf import export_complete, load
from phased_jax.hf.convert import read_adapter
from phased_jax.hf.peft import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterError,
    adapter_complete,
    merged_first,
)
from phased_jax.init_from import read_checkpoint_config
from phased_jax.model.config import ModelConfig
from phased_jax.model.lora import join, split
from phased_jax.model.lora import merge as lora_merge
from phased_jax.model.transformer import Transformer
from phased_jax.sharding import Placement, param_shardings, place_params

log = logging.getLogger(__name__)
USAGE = "usage: phased-jax generate [--config FILE] [--config.SECTION.FIELD=VALUE ...] [options]"
CONFIG_HELP = """The experiment config (--config FILE, default: phased_jax.config's defaults; override
any field with --config.SECTION.FIELD=VALUE, as in `phased-jax train`) gives the device mesh and
its rules (config.mesh), the prompt template (config.data.template) and, when --config or a
--config.model override is given, the precision (config.model.dtype / param_dtype); without
either, the checkpoint's own precision is used."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phased-jax generate", description=__doc__.split("\n")[0],
                                epilog=CONFIG_HELP)
    add_config_help(p, "--config.mesh.shape='(2,-1,1)'")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", metavar="DIR", help="Hugging Face model directory")
    src.add_argument("--checkpoint", metavar="DIR",
                     help="Orbax params checkpoint (DIR/params + DIR/model_config.json, as "
                          "written by `phased-jax convert` / phased_jax.params_checkpoint)")
    src.add_argument("--run", metavar="OUTPUT_DIR",
                     help="a training run's output_dir: answer with every phase's params "
                          "(OUTPUT_DIR/phases/phase<k>-<name>/, in phase order) and the final "
                          "export (OUTPUT_DIR/hf/, if there), in one process; --output is then "
                          "a folder that gets <phase>.jsonl for each phase and final.jsonl. "
                          "A LoRA run's phases are adapters: each is put on the run's base "
                          "model (see --base)")
    p.add_argument("--adapter", metavar="DIR",
                   help="with --hf or --checkpoint (the base): answer with the base plus this "
                        "PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors, "
                        "e.g. a LoRA run's RUN/adapter or RUN/phases/PHASE), unmerged")
    p.add_argument("--base", metavar="DIR",
                   help="with --run of a LoRA run: the base model its adapters go on, an HF "
                        "directory or a params checkpoint (default: the adapters' "
                        "base_model_name_or_path, which is the run's model.init_from)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--input", metavar="FILE", help="questions in any format `train` reads: JSONL {instruction, input?, id?, "
                           "test_set?}, an Alpaca JSON list, the authors' or phased-score's JSONL "
                           "(outputs are ignored); or conversations (needs "
                           "--config.data.template=chat): {messages: [{role, content}, ...]} or "
                           "ShareGPT {conversations: [{from, value}, ...]} ending with the user "
                           "turn to answer, or MT-Bench {question_id, turns: [q1, q2, ...]}, "
                           "answered turn by turn")
    data.add_argument("--test-sets", metavar="DIR|paper",
                      help="directory of <set>.jsonl (any --input format), or 'paper' for the "
                           "paper's six sets")
    p.add_argument("--output", required=True, metavar="FILE|DIR",
                   help="the answers file; with --run, a folder (created) of one file per model")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="default: the model directory (a params checkpoint's DIR/tokenizer/; "
                        "with --run, the first phase's, else OUTPUT_DIR/hf; with adapters, "
                        "if those have none, the base's)")
    p.add_argument("--max-length", type=int, default=1024, help="prompt + answer tokens (paper: 1024)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="answer tokens at most (default: whatever --max-length leaves)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the paper)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--length-multiple", type=int, default=64,
                   help="prompt lengths are padded to a multiple of this (fewer compiles)")
    p.add_argument("--limit", type=int, default=0, help="first N items of each set (smoke runs)")
    p.add_argument("--generator", default="", help="name recorded in each line (default: the model directory's name; for a "
                        "run's RUN/hf or RUN/phases/PHASE, RUN or RUN/PHASE; with --run, it "
                        "replaces RUN: NAME/PHASE and NAME)")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "phased_jax" / "testsets"),
                   help="where --test-sets paper keeps the built sets")
    p.add_argument("--alpaca-eval-source", default=testsets.ALPACA_EVAL_SOURCE)
    p.add_argument("--wizardlm-source", default=testsets.WIZARDLM_SOURCE)
    p.add_argument("--koala-source", default=testsets.KOALA_SOURCE,
                   help="Koala release file/URL, or 'alpaca_eval' for AlpacaEval's subset")
    return p


def load_items(args: argparse.Namespace) -> list[testsets.TestItem]:
    if args.input:
        if not Path(args.input).is_file():
            raise ConfigError(f"--input {args.input}: file not found")
        items = testsets.read_test_set(Path(args.input))
    elif args.test_sets == "paper":
        items = testsets.paper_sets(args.cache_dir, alpaca_eval_source=args.alpaca_eval_source,
                                    wizardlm_source=args.wizardlm_source,
                                    koala_source=args.koala_source)
    else:
        items = testsets.load_dir(args.test_sets)
    testsets.check_unique(items)
    if args.limit:
        seen: dict[str, int] = {}
        items = [i for i in items if (seen.__setitem__(i.test_set, seen.get(i.test_set, 0) + 1)
                                      or seen[i.test_set] <= args.limit)]
    return items


def load_model(path: str, placement: Placement, precision: tuple[str, str] | None, *,
               hf: bool) -> tuple[Any, Any]:
    """(model, params) from an HF directory (`hf`) or an Orbax params checkpoint, placed on the
    mesh, in `precision` (compute dtype, param dtype) or, if None, the checkpoint's own."""
    compute, stored = precision or (None, None)
    if hf:
        model, params = load(path, dtype=stored, compute_dtype=compute)
        return model, place_params(model.cfg, params, placement)
    cfg = params_checkpoint.read_model_config(path)
    if precision:
        cfg = cfg.replace(dtype=compute, param_dtype=stored)
    # Restored straight into the mesh's shardings: never gathered on one host.
    _, params = params_checkpoint.load_params(path, param_shardings(cfg, placement))
    if precision:
        params = jax.tree.map(lambda x: x.astype(stored), params)
    return Transformer(cfg), params


def check_args(args: argparse.Namespace) -> None:
    if args.adapter and args.run:
        raise UsageError("--adapter goes with --hf or --checkpoint (its base); a LoRA run's "
                         "adapters are found by --run itself (its base: --base)")
    if args.base and not args.run:
        raise UsageError("--base is the base model of --run's adapters; with --hf or "
                         "--checkpoint, that flag is the base: add --adapter DIR")
    for name in ("max_length", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    try:
        Sampling(args.temperature, args.top_p)
    except ValueError as e:
        raise ConfigError(f"--temperature/--top-p: {e}") from None


PHASE_DIR = re.compile(r"phase(\d+)-.+")
RUN_FIX = ("expects phases/phase<k>-<name>/ as `phased-jax train` writes them with "
           "checkpoint.phase_params=True; give that run's output_dir")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """One model to answer with: its directory and kind (with `adapter`, the base's), the PEFT
    adapter put on it if any and, under --run, its file's stem."""

    path: str
    hf: bool
    label: str = ""
    adapter: str = ""
    # adapters merged into the base first, in order (a `merge_each_phase` run's earlier phases)
    merged: tuple[str, ...] = ()

    @property
    def adapter_flag(self) -> str:
        """The flag that named the adapter, for its errors."""
        return "--run" if self.label else "--adapter"


def is_adapter(directory: str | Path) -> bool:
    return Path(directory, ADAPTER_CONFIG).is_file()


def run_base(run_dir: str, first_adapter: Path, base: str | None) -> ModelSource:
    """The base model a LoRA run's adapters go on: `base` (--base) or the first adapter's
    base_model_name_or_path (the run's model.init_from), checked as a model flag is."""
    field = "--base"
    if not base:
        config = first_adapter / ADAPTER_CONFIG
        try:
            base = str(json.loads(config.read_text()).get("base_model_name_or_path") or "")
        except (OSError, ValueError, AttributeError) as e:
            raise UsageError(f"--run {run_dir}: {config} is unreadable ({e}); give the "
                             "base model with --base DIR") from None
        if not base:
            raise UsageError(f"--run {run_dir}: {config} names no base model "
                             "(base_model_name_or_path is empty); give it with --base DIR")
        field = f"the base model of --run's adapters ({config}'s base_model_name_or_path)"
    local_paths.check_local_dir(base, field, "a Hugging Face model (config.json) or a params "
                                "checkpoint (model_config.json)", "give it with --base DIR "
                                "(the run's model.init_from)",
                                holds=("config.json", "model_config.json"))
    return ModelSource(base, hf=Path(base, "config.json").is_file())


def run_models(run_dir: str, base: str | None = None) -> list[ModelSource]:
    """A run's models: each `phases/phase<k>-<name>/` by k (phase10 after phase9), then `hf/`
    if there (a LoRA run's `adapter/` on the base if it exported no `hf/`). An incomplete one
    is an error naming it: answers from whichever phases happen to be whole would make a
    comparison that silently lacks a phase. A LoRA run's phases are adapters of one base."""
    phases = Path(run_dir, "phases")
    found = sorted((int(m.group(1)), p.name) for p in (phases.iterdir() if phases.is_dir() else ())
                   if p.is_dir() and (m := PHASE_DIR.fullmatch(p.name)))
    if not found:
        what = "its phases/ holds no phase<k>-<name>/" if phases.is_dir() else "it has no phases/"
        raise UsageError(f"--run {run_dir}: not a training run's output_dir ({what}); {RUN_FIX}")
    lora = is_adapter(phases / found[0][1])
    if base and not lora:
        raise UsageError(f"--base: --run {run_dir} is not a LoRA run (phases/{found[0][1]} is "
                         "a params checkpoint, not an adapter), so it has no base to give")
    root = run_base(run_dir, phases / found[0][1], base) if lora else None
    models = []
    for _, name in found:
        if root is not None:
            if not adapter_complete(phases / name):
                raise UsageError(f"--run {run_dir}: phases/{name} is not a complete PEFT "
                                 f"adapter (no {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}): resume "
                                 "that run with `phased-jax train`, or move it away")
            try:
                earlier = tuple(str(p) for p in merged_first(phases / name))
            except AdapterError as e:
                raise UsageError(f"--run {run_dir}: {e}") from None
            models.append(dataclasses.replace(root, label=name, adapter=str(phases / name),
                                              merged=earlier))
            continue
        if not params_checkpoint.params_complete(phases / name):
            raise UsageError(f"--run {run_dir}: phases/{name} is not a complete params checkpoint "
                             "(its write was cut short?): resume that run with `phased-jax train` "
                             "(it redoes a phase's params at the phase's end), or move it away")
        models.append(ModelSource(str(phases / name), hf=False, label=name))
    hf_dir, adapter_dir = Path(run_dir, "hf"), Path(run_dir, "adapter")
    if hf_dir.exists():
        if not export_complete(hf_dir):
            raise UsageError(f"--run {run_dir}: hf/ is not a complete Hugging Face export (its "
                             "write was cut short?): rerun `phased-jax train` with the run's "
                             "config (it redoes an incomplete export), or move it away")
        models.append(ModelSource(str(hf_dir), hf=True, label="final"))
    elif root is not None and adapter_complete(adapter_dir):
        models.append(dataclasses.replace(root, label="final", adapter=str(adapter_dir)))
    return models


def model_sources(args: argparse.Namespace) -> list[ModelSource]:
    """What to answer with: --hf or --checkpoint (and --adapter), or every model of --run
    (whose answer files are checked here too, so a folder standing where one goes fails
    before any decoding)."""
    if not args.run:
        models = [ModelSource(args.hf or args.checkpoint, hf=bool(args.hf),
                              adapter=args.adapter or "")]
    else:
        models = run_models(args.run, args.base)
        for m in models:
            local_paths.check_output_file(answers_path(args.output, m), "--output (with --run)")
    check_adapters(models)
    return models


def check_adapters(models: list[ModelSource]) -> None:
    """Each adapter read against its base's config (a small JSON file), so an adapter that
    cannot be used fails before the questions, the tokenizer or any weight is read."""
    configs: dict[str, ModelConfig] = {}
    for m in models:
        if m.adapter:
            if m.path not in configs:
                configs[m.path] = read_checkpoint_config(m.path, "the base model")
            read_adapter(m.adapter, configs[m.path], m.path, m.adapter_flag)


def answers_path(output: str, model: ModelSource) -> Path:
    """Where a model's answers go: --output itself, or under --run `<output>/<label>.jsonl`."""
    return Path(output, f"{model.label}.jsonl") if model.label else Path(output)


def main(argv: list[str] | None = None) -> int:
    config_argv, rest = split_config_argv(argv or [])
    args = parser().parse_args(rest)
    check_args(args)
    local_paths.check_generate(args)  # model, tokenizer, questions, --output: one line each
    models = model_sources(args)
    flag = ("--hf" if args.hf else "--checkpoint" if args.checkpoint else
            "--base" if args.base else "--run")
    config = parse_config_argv(config_argv, "phased-jax generate", USAGE,
                               default=get_default_config, sections=("model",),
                               model_source=(models[0].path, flag)).config
    template = config.data.template
    if template not in TEMPLATES:
        raise UsageError(f"data.template={template!r} is invalid: choose one of "
                         f"{', '.join(map(repr, TEMPLATES))}")
    precision = (config.model.dtype, config.model.param_dtype) if config_argv else None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    items = load_items(args)
    check_template(items, template)
    tokenizer_dir, tokenizer_flag = tokenizer_source(args, models[0])
    tokenizer = load_tokenizer(tokenizer_dir, tokenizer_flag)  # once for every model
    if template == "chat":
        check_chat_tokenizer(tokenizer, tokenizer_dir, tokenizer_flag)
    placement = Placement.from_config(config.mesh)  # one mesh: every model's decoder the same
    prompts = [question_ids(i, (), template, tokenizer) for i in items]  # the first questions
    warn_too_long(items, dict(enumerate(prompts)), args.max_length)
    written = []
    base = None  # (directory, model, params): the base adapters go on, read once for them all
    for n, source in enumerate(models, 1):
        if len(models) > 1:
            log.info("model %d/%d: %s", n, len(models), source.adapter or source.path)
        if source.adapter:
            if base is None or base[0] != (source.path, source.merged):
                base = None  # the last one's memory first
                base = ((source.path, source.merged),
                        *merged_base(source, *load_model(source.path, placement, precision,
                                                         hf=source.hf)))
            model, params = with_adapter(base[1], base[2], source, placement)
        else:
            base = None
            model, params = load_model(source.path, placement, precision, hf=source.hf)
        written.append(answer_with(source, model, params, args, items, prompts, tokenizer,
                                   template, placement))
        del model, params  # a --run holds one model (and the base of its adapters) at a time
    if args.run and jax.process_index() == 0:
        print(f"wrote {len(written)} answer files to {args.output}: "
              f"{', '.join(p.name for p in written)}", flush=True)
    return 0


def merged_base(source: ModelSource, model: Transformer, params: Any) -> tuple[Transformer, Any]:
    """The base with `source.merged`'s adapters merged in, in order, as the `merge_each_phase`
    run that trained `source.adapter` had it (the same `lora.merge`, in the base's dtype)."""
    for path in source.merged:
        spec, adapters = read_adapter(path, model.cfg, source.path, source.adapter_flag)
        params = jax.jit(functools.partial(lora_merge, model.cfg, spec))(params, adapters)
    return model, params


def with_adapter(model: Transformer, params: Any, source: ModelSource,
                 placement: Placement) -> tuple[Transformer, Any]:
    """The base with a PEFT adapter on it, unmerged: `Transformer(cfg, lora=spec)` and the
    joined params, the adapters placed as `param_shardings` shards them with the base (so
    each sits with the weight it adapts). The base's params are shared, not copied."""
    spec, adapters = read_adapter(source.adapter, model.cfg, source.path, source.adapter_flag)
    shardings = split(param_shardings(model.cfg, placement, lora=spec))[1]
    return Transformer(model.cfg, lora=spec), join(params, jax.device_put(adapters, shardings))


def check_template(items: list[testsets.TestItem], template: str) -> None:
    """A conversation is rendered by the tokenizer's chat template, as training renders one:
    another template is a one-line error naming the first conversation."""
    talk = next((i for i in items if i.turns), None)
    if talk is not None and template != "chat":
        raise UsageError(f"{talk.where}: a conversation, which data.template={template!r} cannot "
                         "render; add --config.data.template=chat (the tokenizer's chat "
                         "template), or give single-turn questions")


def check_chat_tokenizer(tokenizer: Any, directory: str, flag: str) -> None:
    """data.template=chat needs the tokenizer's chat template: one line before any model."""
    try:
        chat_template(tokenizer)
    except ConfigError:
        raise UsageError(f"{flag} {directory}: the tokenizer has no chat template "
                         "(tokenizer_config.json 'chat_template', or chat_template.jinja), which "
                         "data.template=chat and conversations need; give one that has it with "
                         "--tokenizer DIR") from None


def question_ids(item: testsets.TestItem, answers: Sequence[str], template: str,
                 tokenizer: Any) -> list[int]:
    """Ids asking the item's next question after the model's `answers`, rendered as training
    renders it: a conversation (with those answers) by the chat template and its generation
    prompt, a single question by `template`."""
    if not item.turns:
        return encode_prompt(item.instruction, item.input, template, tokenizer)
    try:
        return encode_chat_prompt(item.conversation(answers), tokenizer)
    except TemplateRefused as e:  # e.g. Mistral's template refuses a system turn
        raise DataError(f"{item.where}: {e}; change the conversation or give a --tokenizer "
                        "whose template takes it") from None


def warn_too_long(items: list[testsets.TestItem], prompts: Mapping[int, Sequence[int]],
                  max_length: int, followup: int = 0) -> None:
    """Name the questions (by item index in `prompts`) that leave no room for an answer."""
    too_long = [f"{items[i].test_set}/{items[i].id}" for i, p in prompts.items()
                if len(p) >= max_length]
    if too_long:
        log.warning("%d prompt(s)%s fill --max-length %d and get empty answers: %s",
                    len(too_long), f" of follow-up {followup}" if followup else "", max_length,
                    ", ".join(too_long[:10]))


def answer_rounds(items: list[testsets.TestItem], prompts: list[list[int]], tokenizer: Any,
                  template: str, max_length: int,
                  decode: Callable[[list[list[int]], int], list[list[int]]]
                  ) -> tuple[list[list[str]], int]:
    """Every item's answers (one per round it asks for) and the tokens generated.

    Round 0 asks every item's first question (`prompts`); round k, each item's k-th follow-up,
    with the model's own answers in the conversation (MT-Bench's turn 2 follows the model's
    turn-1 answer). `decode(prompts, k)` answers a round's questions in batches, so a test set
    costs as many batched passes as its longest conversation has questions.
    """
    answers: list[list[str]] = [[] for _ in items]
    asked = dict(enumerate(prompts))  # item -> ids of its question this round
    n_tokens = 0
    for k in range(max((i.rounds for i in items), default=0)):
        if k:
            asked = {i: question_ids(items[i], answers[i], template, tokenizer)
                     for i in asked if items[i].rounds > k}
            warn_too_long(items, asked, max_length, k)
        for i, ids in zip(asked, decode(list(asked.values()), k), strict=True):
            answers[i].append(tokenizer.decode(ids, skip_special_tokens=True))
            n_tokens += len(ids)
    return answers, n_tokens


def answer_with(source: ModelSource, model: Transformer, params: Any, args: argparse.Namespace,
                items: list[testsets.TestItem], prompts: list[list[int]], tokenizer: Any,
                template: str, placement: Placement) -> Path:
    """Answer every item with one model, write its file; returns the file. The jitted
    decoder stays cached (`decode.decode_fn`, keyed by the model's config and LoRA spec) for
    the next model of the same shapes."""
    eos, pad = stop_ids(template, tokenizer), pad_id_of(tokenizer)

    def decode(questions: list[list[int]], k: int) -> list[list[int]]:
        key = None if k == 0 else jax.random.fold_in(jax.random.key(args.seed), k)  # draws apart
        return generate_ids(
            model, params, questions, eos_token_ids=eos, pad_id=pad,
            max_new_tokens=args.max_new_tokens or args.max_length, max_length=args.max_length,
            batch_size=args.batch_size, sampling=Sampling(args.temperature, args.top_p),
            seed=args.seed, placement=placement, length_multiple=args.length_multiple, key=key)

    t0 = time.perf_counter()
    answers, n_tokens = answer_rounds(items, prompts, tokenizer, template, args.max_length,
                                      decode)
    seconds = time.perf_counter() - t0
    generator = generator_name(source.adapter or source.path, args.generator,
                               run=bool(args.run))
    rows = [dict(i.answer(*a).to_row(), generator=generator)
            for i, a in zip(items, answers, strict=True)]
    out = answers_path(args.output, source)
    if jax.process_index() == 0:  # every host decoded the same rows; one writes them
        write_jsonl_atomic(out, rows)
        print(f"wrote {len(rows)} answers by {generator!r} to {out} ({n_tokens} tokens in "
              f"{seconds:.1f}s, {n_tokens / max(seconds, 1e-9):.1f} tokens/s incl. compile)",
              flush=True)
    return out


def tokenizer_source(args: argparse.Namespace, first: ModelSource) -> tuple[str, str]:
    """(directory, the flag to name in errors): --tokenizer, else the model's own (a params
    checkpoint keeps it in DIR/tokenizer/, as `convert` and the runner's phases/ write it; a
    run's, in its `first` phase, else in its hf/; a LoRA run's adapters hold none, so without
    hf/ it is the base's, as it is for --adapter)."""
    if args.tokenizer:
        return args.tokenizer, "--tokenizer"
    if args.run:
        own = first.adapter or first.path
        if Path(own, "tokenizer").is_dir():
            return str(Path(own, "tokenizer")), f"--tokenizer (default: {own}/tokenizer)"
        if not first.adapter or Path(args.run, "hf").is_dir():
            return str(Path(args.run, "hf")), "--tokenizer (default: OUTPUT_DIR/hf of --run)"
    if not first.hf and Path(first.path, "tokenizer").is_dir():
        return str(Path(first.path, "tokenizer")), "--tokenizer (default: DIR/tokenizer)"
    return first.path, "--tokenizer (default: the model directory)"


def generator_name(model_dir: str, given: str = "", *, run: bool = False) -> str:
    """The name a model's answers carry: its directory's (with an adapter, the adapter's), or
    for the directories a run writes (`RUN/hf`, `RUN/adapter`, `RUN/phases/phaseK-...`) the
    run's, so two runs' answers never look alike.
    `given` (--generator) is the name; under --run it stands for RUN, so phases stay apart."""
    path = Path(model_dir).resolve()
    if given and not run:
        return given
    if path.name in ("hf", "adapter"):
        return given or path.parent.name
    if path.parent.name == "phases":
        return f"{given or path.parent.parent.name}/{path.name}"
    return given or path.name
