"""The paper's experiments (Pang et al. 2024, DESIGN.md section 1) as configs.

Every file in `configs/` is one call of `paper_config`; the hyperparameters are the
defaults of `phased_jax.config` (lr 5e-6, 2 epochs a phase, global batch 128, AdamW 0.9/0.95,
weight decay 0.1, warmup 0.1 + cosine, clip 1.0, max length 2048, no packing, seed 3517),
so they are written once.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from phased_jax.config import get_default_config, model_section

# Where the weights and the scored data live; override on the command line or edit here.
HF_WEIGHTS = {
    "llama2-7b": "checkpoints/Llama-2-7b-hf",
    "llama2-13b": "checkpoints/Llama-2-13b-hf",
    "llama2-70b": "checkpoints/Llama-2-70b-hf",
    "mistral-7b-v0.1": "checkpoints/Mistral-7B-v0.1",
    "llama3-8b": "checkpoints/Meta-Llama-3-8B",
    "llama3-70b": "checkpoints/Meta-Llama-3-70B",
}
SCORED_ALPACA = "data/alpaca52k-scored.jsonl"  # `phased-score` output for Alpaca 52K
# The forgetting ablations hold out this fraction of each stage (about 1,040 of Alpaca's 52K
# records); runs compared with them need the same: --config.data.eval_fraction=0.02
FORGETTING_EVAL_FRACTION = 0.02


def paper_config(preset: str, order: str, name: str) -> ConfigDict:
    """A full-size run of `preset` on GPT-4-scored Alpaca with the phase order `order`."""
    c = get_default_config()
    c.name = name
    c.output_dir = f"runs/{name}"
    # The platform's attention kernel (splash on TPU, cuDNN on GPU) and a chunked loss: the
    # same numbers as xla attention and full logits, in the memory `phased-jax compile` shows.
    c.model = model_section(preset, remat_policy="full", attention_impl="auto")
    c.model.init_from = HF_WEIGHTS[preset]
    c.train.loss_chunk = 512
    c.data.paths = (SCORED_ALPACA,)
    c.data.tokenizer = HF_WEIGHTS[preset]
    c.data.order = order
    c.export.hf_dir = f"runs/{name}/hf"
    return c
