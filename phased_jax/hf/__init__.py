"""Hugging Face checkpoints in and out: `load`, `save`, and the config translation.

    model, params = phased_jax.hf.load("path/to/hf-dir", dtype="bfloat16")
    logits = model.apply({"params": params}, input_ids)
    phased_jax.hf.save("path/to/out", model, params, tokenizer=tok)
"""

from phased_jax.hf.from_hf import load
from phased_jax.hf.hf_config import config_from_hf, hf_config_from
from phased_jax.hf.to_hf import export_complete, save

__all__ = ["config_from_hf", "export_complete", "hf_config_from", "load", "save"]
