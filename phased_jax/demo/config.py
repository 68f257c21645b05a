"""The demo's experiment: a tiny Llama on the bundled graded tasks, sized for 2 CPU cores.

`configs/demo.py` is this config; `make demo` trains it twice, phased (`data.order=1,2,3`)
and one-off (`oneoff`), with the same epochs over the same examples, so the same token budget,
and the same optimizer settings (each phase its own warmup and cosine, as in the paper).

The recipe is what a tiny model from random weights learns fastest on two cores: one token per
fixed prompt phrase (an example is at most 28 tokens, so a step is cheap), many generated
examples seen twice (2 epochs a phase, the paper's count) rather than few seen often, and a
high learning rate. Fewer steps than this (e.g. a third less data) cost the phased run most:
each phase then ends before it has consolidated, and the next one overwrites more of it.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from phased_jax.config import get_default_config, model_section
from phased_jax.demo.tasks import DEFAULT_N_TEST, DEFAULT_N_TRAIN, prompt_phrases

DATA_SIZES = {"n_train": DEFAULT_N_TRAIN, "n_test": DEFAULT_N_TEST}
BYTE_VOCAB = 259  # bytes + 3 specials, no merges: characters, so reversing a word maps token
#                   for token
TOKENIZER_VOCAB = BYTE_VOCAB + len(prompt_phrases())  # plus one token per fixed prompt phrase


def demo_config(out_dir: str = "demo_out", order: str = "1,2,3", vocab_size: int = TOKENIZER_VOCAB
                ) -> ConfigDict:
    name = "phased" if order != "oneoff" else "oneoff"
    c = get_default_config()
    c.name = f"demo-{name}"
    c.output_dir = f"{out_dir}/{name}"
    c.seed = 0
    c.model = model_section("tiny-llama", vocab_size=vocab_size, hidden_size=96,
                            intermediate_size=256, num_layers=3, num_heads=4, num_kv_heads=2,
                            max_position_embeddings=64)
    c.data.paths = (f"{out_dir}/data/train.jsonl",)
    c.data.tokenizer = f"{out_dir}/tokenizer"
    c.data.cache_dir = f"{out_dir}/token_cache"
    c.data.order = order
    c.data.max_length = 28
    c.train.global_batch = 32
    c.train.epochs_per_phase = 2
    c.train.lr = 3e-3
    c.train.warmup_ratio = 0.1
    c.train.weight_decay = 0.1
    c.model.dtype = "float32"
    c.train.log_every = 20
    c.train.peak_flops = 0.0
    c.checkpoint.every_steps = 500
    c.checkpoint.keep = 2
    c.export.dtype = "float32"
    return c
