"""Answers to the paper's test sets: batched KV-cache decoding and the `generate` subcommand.

Python API (what the demo calls):
    from phased_jax.generate import generate
    answers = generate(model, params, tokenizer, prompts, max_new_tokens=256)
`prompts` are rendered prompt strings or token-id lists (see `decode.generate`).
"""

from phased_jax.generate.decode import Sampling, generate, generate_ids
from phased_jax.generate.run import main

__all__ = ["Sampling", "generate", "generate_ids", "main"]
