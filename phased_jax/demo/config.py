"""The demo's experiment: a tiny Llama pretrained on prose, then instruction-tuned five ways.

Two stages, both through the project's runner (`phased_jax.train.runner.run`):

1. Pretraining (`pretrain_config`, once, cached by its inputs): plain prose stating the word
   facts (`phased_jax.demo.corpus`), template `text` (loss on every token), lr 3e-3. Exported
   to HF format; that directory is the base model.
2. Instruction tuning (`demo_config`, `configs/demo.py`), from the base via `model.init_from`
   as a user would start from an HF model: the authors' template, response-only loss, a fresh
   AdamW and warmup + cosine schedule per phase, lr 1e-3 (a third of pretraining's), batch 16.
   Arms (`ARMS`, name -> config overrides): phased (`data.order=1,2,3`), one-off (`oneoff`)
   and reverse (`3,2,1`), the same epochs over the same examples (the same token budget); and
   the follow-up question, two phased variants against forgetting: phased-replay (phase k > 1
   also replays half its size from earlier phases, `data.replay=0.5`) and phased-one-schedule
   (one warmup + decay and one optimizer over the whole run, `train.schedule_scope=run`). Each
   on every one of `SEEDS` (the seed orders the examples; data split and base are shared).

Design criteria, fixed before comparing the arms and never tuned on their difference:
- Headroom: after one-off tuning each difficulty band sits between 20% and 90% exact match,
  so the comparison is neither at the floor nor at the ceiling. Sizes were set by looking at
  one-off's band accuracies only (seed 0, before any phased run): with 3,000 instructions
  (2 epochs), batch 32 and lr 3e-4 one-off reached 31 / 12 / 7% (phase 1 / 2 / 3 bands);
  lr 1e-3: 58 / 34 / 13%; batch 16 and lr 5e-4: 53 / 37 / 18%; batch 16 and lr 1e-3:
  72 / 57 / 31%, the setting kept. (The paper's ratio of pretraining to tuning lr is larger;
  at this scale a smaller lr left the hardest band below the floor.)
- The follow-up (issue 22, after phased lost to one-off here): its two arms and their
  settings (replay 0.5; one schedule), the comparisons (`FOLLOW_UP`) and the 5 seeds were
  fixed before either arm was run, and are not tuned on any outcome.
- Budget: `make demo` stays under 10 minutes on 2 CPU cores including the install.
- The base knows the operations but has never seen an instruction: 32,000 documents (1,000
  steps) bring it to 91% / 100% / 100% on reversing / capitalising / rotating unseen test
  words in prose (16,000 left reversing visibly weaker); the tuned model must map instruction
  phrases to chains it knows from prose and answer without writing the steps out.
"""

from __future__ import annotations

from typing import Any

from ml_collections import ConfigDict

from phased_jax.config import get_default_config, model_section
from phased_jax.demo.corpus import prose_phrases
from phased_jax.demo.tasks import prompt_phrases

HEADROOM = (0.20, 0.90)  # one-off's exact match per band must sit in here (design criterion)
SEEDS = (0, 1, 2, 3, 4)
# name (the run's directory seed<k>/<name>/ and its label) -> the config fields it sets
ARMS: dict[str, dict[str, Any]] = {
    "phased": {"data.order": "1,2,3"},
    "oneoff": {"data.order": "oneoff"},
    "reverse": {"data.order": "3,2,1"},
    "phased-replay": {"data.order": "1,2,3", "data.replay": 0.5},
    "phased-one-schedule": {"data.order": "1,2,3", "train.schedule_scope": "run"},
}
ARM_NOTES = {  # what each arm asks, for the report
    "phased": "easy to hard, a fresh optimizer and warmup + decay per phase (the paper)",
    "oneoff": "all the data at once (the baseline)",
    "reverse": "hard to easy (the paper's ablation)",
    "phased-replay": "phased, and each later phase also trains on half its size in examples "
                     "drawn from the earlier phases (more tokens than the others)",
    "phased-one-schedule": "phased, with one warmup + decay and one optimizer state over the "
                           "whole run instead of one per phase",
}
# Pre-registered: each arm is compared with one-off, and each of these variants also with the
# arm it varies (variant -> that arm): does it forget less than plain phased?
FOLLOW_UP = {"phased-replay": "phased", "phased-one-schedule": "phased"}
DATA_SIZES = {"n_train": 3000, "n_test": 300}
CORPUS_DOCS = 32000
BYTE_VOCAB = 259  # bytes + 3 specials, no merges: characters, so reversing a word maps token
#                   for token
TOKENIZER_VOCAB = BYTE_VOCAB + len(prompt_phrases()) + len(prose_phrases())  # + phrase tokens


def _model(vocab_size: int) -> ConfigDict:
    m = model_section("tiny-llama", vocab_size=vocab_size, hidden_size=96,
                      intermediate_size=256, num_layers=3, num_heads=4, num_kv_heads=2,
                      max_position_embeddings=64)
    m.dtype = "float32"
    return m


def _common(c: ConfigDict, out_dir: str) -> ConfigDict:
    c.data.tokenizer = f"{out_dir}/tokenizer"
    c.data.cache_dir = f"{out_dir}/token_cache"
    c.train.warmup_ratio = 0.1
    c.train.weight_decay = 0.1
    c.train.log_every = 10
    c.train.peak_flops = 0.0
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 1
    c.export.dtype = "float32"
    return c


def pretrain_config(out_dir: str = "demo_out", run_dir: str = "demo_out/pretrain",
                    vocab_size: int = TOKENIZER_VOCAB) -> ConfigDict:
    """The base model's pretraining run: one pass over the prose corpus."""
    c = get_default_config()
    c.name = "demo-pretrain"
    c.output_dir = run_dir
    c.seed = 0
    c.model = _model(vocab_size)
    c.data.paths = (f"{out_dir}/data/corpus.jsonl",)
    c.data.template = "text"
    c.data.order = "oneoff"
    c.data.max_length = 64
    c.train.global_batch = 32
    c.train.epochs_per_phase = 1
    c.train.lr = 3e-3
    return _common(c, out_dir)


def set_field(c: ConfigDict, dotted: str, value: Any) -> None:
    """`set_field(c, "data.replay", 0.5)` sets c.data.replay, as `--config.data.replay` would."""
    *sections, field = dotted.split(".")
    for s in sections:
        c = c[s]
    c[field] = value


def demo_config(out_dir: str = "demo_out", arm: str = "phased", seed: int = 0,
                vocab_size: int = TOKENIZER_VOCAB) -> ConfigDict:
    """One instruction-tuning arm (a name in `ARMS`) from the base model in `<out_dir>/base`."""
    if arm not in ARMS:
        raise ValueError(f"unknown demo arm {arm!r}; the arms are {', '.join(ARMS)}")
    c = get_default_config()
    c.name = f"demo-{arm}-seed{seed}"
    c.output_dir = f"{out_dir}/seed{seed}/{arm}"
    c.seed = seed
    c.model = _model(vocab_size)
    c.model.init_from = f"{out_dir}/base"
    c.data.paths = (f"{out_dir}/data/train.jsonl",)
    c.data.max_length = 28
    c.train.global_batch = 16
    c.train.epochs_per_phase = 2
    c.train.lr = 1e-3
    c = _common(c, out_dir)
    for field, value in ARMS[arm].items():
        set_field(c, field, value)
    return c
